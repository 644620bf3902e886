// A character-level GPT trained on real text through a pipe, beside plain
// training of the same model on the same batches: token and position
// embeddings, pre-LN blocks of causal self-attention and MLP, dropout, and
// an output head tied to the token embedding; AdamW with warm-up and cosine
// decay, the whole model's gradient norm clipped, fp32, bf16 or fp16 with a
// loss scaler, checkpoints that a restarted job resumes from.
//
//   ./build/examples/gpt                         # one process, K partitions
//   PYTHONPATH=~/.cache/gpipe/torch-2.11.0 python3 -m torch.distributed.run \
//       --standalone --nproc-per-node 4 --no-python ./build/examples/gpt \
//       --distributed 1 --stages 2              # 2 stages x 2 replicas
//
// It prints the loss curve of the pipe and of plain training side by side
// (and draws both, gpt_loss.svg), tokens per second, peak memory per rank,
// and text the trained pipe generates. Exits 1 when the curves disagree.
#include "../flags.h"

#include <gpipe/gpipe.h>
#if GPIPE_EXAMPLE_DISTRIBUTED
#include <gpipe/distributed.h>
#endif

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace fs = std::filesystem;

constexpr const char* kProgram = "gpt";
constexpr const char* kUsage =
    "usage: gpt [flags]; under torchrun with --distributed 1\n"
    "  --text FILE            training text (default: the King James Genesis\n"
    "                         and Exodus the repository ships)\n"
    "  --steps N              optimizer steps (default 200)\n"
    "  --every N              print the curves every N steps (default 50)\n"
    "  --layers N             transformer blocks (default 4)\n"
    "  --width N              model width (default 64)\n"
    "  --heads N              attention heads (default 4)\n"
    "  --context N            characters per sample (default 64)\n"
    "  --batch N              samples per step, all replicas (default 16)\n"
    "  --microbatches N       (default 4)\n"
    "  --partitions N         one process: partitions (default 2)\n"
    "  --schedule NAME        fill_drain, 1f1b, ... (default 1f1b)\n"
    "  --checkpoint MODE      never, except_last, always (default except_last)\n"
    "  --lr X                 peak learning rate (default 0.003)\n"
    "  --warmup N             warm-up steps (default 20)\n"
    "  --clip X               max gradient norm; 0: none (default 1)\n"
    "  --dropout X            (default 0: the curves then agree to rounding)\n"
    "  --precision NAME       fp32, bf16 (autocast) or fp16 (autocast and a\n"
    "                         loss scaler) (default fp32)\n"
    "  --device cpu|cuda      (default cpu)\n"
    "  --distributed 0|1      under torchrun: a pipe across the ranks\n"
    "  --stages N             ranks per pipeline; 0: every rank (default 0)\n"
    "  --zero 0|1             shard the optimizer state over replicas\n"
    "  --compare 0|1          train plain alongside, rank 0 (default 1)\n"
    "  --checkpoint-every N   save every N steps to --checkpoint-dir and\n"
    "                         resume from its newest (default 0: never)\n"
    "  --checkpoint-dir DIR   (default gpt_checkpoints)\n"
    "  --kill-at-step N       distributed, first attempt: the last rank\n"
    "                         kills itself before step N (a restart test)\n"
    "  --sample N             characters to generate at the end (default 200)\n"
    "  --output DIR           gpt_loss.svg and gpt_curve.csv (default .)\n"
    "  --seed N               (default 0)\n"
    "  --untimed N            distributed: steps left out of --json's timing\n"
    "                         (default 0)\n"
    "  --replica-bucket-bytes N  distributed, with replicas: their gradient\n"
    "                         sums' bucket size; 0: all after the drain\n"
    "                         (default 0)\n"
    "  --json 0|1             distributed: rank 0 ends with a JSON line of the\n"
    "                         median step time and every rank's peak RSS, as\n"
    "                         benchmarks/gpt_vs_pipelining.py reads (default 0)\n";

struct Flags {
  std::string text = GPIPE_GPT_TEXT;
  int64_t steps = 200;
  int64_t every = 50;
  int64_t layers = 4;
  int64_t width = 64;
  int64_t heads = 4;
  int64_t context = 64;
  int64_t batch = 16;
  int64_t microbatches = 4;
  int64_t partitions = 2;
  std::string schedule = "1f1b";
  gpipe::Checkpoint checkpoint = gpipe::Checkpoint::ExceptLast;
  double lr = 3e-3;
  int64_t warmup = 20;
  double clip = 1.0;
  double dropout = 0.0;
  std::string precision = "fp32";
  std::string device = "cpu";
  bool distributed = false;
  int64_t stages = 0;
  bool zero = false;
  bool compare = true;
  int64_t checkpoint_every = 0;
  std::string checkpoint_dir = "gpt_checkpoints";
  int64_t kill_at_step = -1;
  int64_t sample = 200;
  std::string output = ".";
  int64_t seed = 0;
  int64_t untimed_steps = 0;
  int64_t replica_bucket_bytes = 0;
  bool json = false;
};

double parse_double(const std::string& name, const std::string& text) {
  try {
    size_t used = 0;
    const double value = std::stod(text, &used);
    if (used == text.size() && value >= 0) {
      return value;
    }
  } catch (const std::exception&) {
  }
  gpipe_example::usage_error(
      kProgram, "--" + name + " needs a number >= 0 (got: " + text + ")");
}

Flags parse_flags(int argc, char** argv) {
  Flags flags;
  using gpipe_example::parse_int;
  gpipe_example::for_each_flag(
      argc,
      argv,
      kProgram,
      kUsage,
      [&](const std::string& name, const std::string& value) {
        const auto whole = [&](int64_t minimum) {
          return parse_int(kProgram, name, value, minimum);
        };
        if (name == "text") {
          flags.text = value;
        } else if (name == "steps") {
          flags.steps = whole(1);
        } else if (name == "every") {
          flags.every = whole(1);
        } else if (name == "layers") {
          flags.layers = whole(1);
        } else if (name == "width") {
          flags.width = whole(1);
        } else if (name == "heads") {
          flags.heads = whole(1);
        } else if (name == "context") {
          flags.context = whole(2);
        } else if (name == "batch") {
          flags.batch = whole(1);
        } else if (name == "microbatches") {
          flags.microbatches = whole(1);
        } else if (name == "partitions") {
          flags.partitions = whole(1);
        } else if (name == "schedule") {
          flags.schedule = value;
        } else if (name == "checkpoint") {
          flags.checkpoint = gpipe_example::checkpoint_of(value);
        } else if (name == "lr") {
          flags.lr = parse_double(name, value);
        } else if (name == "warmup") {
          flags.warmup = whole(0);
        } else if (name == "clip") {
          flags.clip = parse_double(name, value);
        } else if (name == "dropout") {
          flags.dropout = parse_double(name, value);
        } else if (name == "precision") {
          if (value != "fp32" && value != "bf16" && value != "fp16") {
            gpipe_example::usage_error(
                kProgram,
                "--precision is fp32, bf16 or fp16 (got: " + value + ")");
          }
          flags.precision = value;
        } else if (name == "device") {
          if (value != "cpu" && value != "cuda") {
            gpipe_example::usage_error(
                kProgram, "--device is cpu or cuda (got: " + value + ")");
          }
          flags.device = value;
        } else if (name == "distributed") {
          flags.distributed = whole(0) != 0;
        } else if (name == "stages") {
          flags.stages = whole(0);
        } else if (name == "zero") {
          flags.zero = whole(0) != 0;
        } else if (name == "compare") {
          flags.compare = whole(0) != 0;
        } else if (name == "checkpoint-every") {
          flags.checkpoint_every = whole(0);
        } else if (name == "checkpoint-dir") {
          flags.checkpoint_dir = value;
        } else if (name == "kill-at-step") {
          flags.kill_at_step = whole(0);
        } else if (name == "sample") {
          flags.sample = whole(0);
        } else if (name == "output") {
          flags.output = value;
        } else if (name == "untimed") {
          flags.untimed_steps = whole(0);
        } else if (name == "replica-bucket-bytes") {
          flags.replica_bucket_bytes = whole(0);
        } else if (name == "json") {
          flags.json = whole(0) != 0;
        } else if (name == "seed") {
          flags.seed = whole(0);
        } else {
          gpipe_example::usage_error(kProgram, "unknown flag --" + name);
        }
      });
  if (flags.width % flags.heads != 0) {
    gpipe_example::usage_error(
        kProgram,
        "--width must be a multiple of --heads (got: " +
            std::to_string(flags.width) + " and " +
            std::to_string(flags.heads) + ")");
  }
  return flags;
}

// ---------------------------------------------------------------------------
// The text.
// ---------------------------------------------------------------------------

struct Corpus {
  std::string alphabet; // the characters, sorted
  torch::Tensor ids; // the whole text, as indices into the alphabet

  static Corpus read(const std::string& path) {
    std::ifstream file(path, std::ios::binary);
    if (!file) {
      gpipe_example::usage_error(kProgram, "cannot read --text " + path);
    }
    const std::string text(
        (std::istreambuf_iterator<char>(file)),
        std::istreambuf_iterator<char>());
    Corpus corpus;
    std::set<char> seen(text.begin(), text.end());
    corpus.alphabet.assign(seen.begin(), seen.end());
    std::vector<int64_t> ids;
    ids.reserve(text.size());
    for (const char c : text) {
      ids.push_back(corpus.alphabet.find(c));
    }
    corpus.ids = torch::tensor(ids, torch::kLong);
    return corpus;
  }

  int64_t vocabulary() const {
    return static_cast<int64_t>(alphabet.size());
  }

  /// Step `step`'s samples: the same on every rank and in every attempt.
  std::pair<torch::Tensor, torch::Tensor> batch(
      int64_t step,
      int64_t size,
      int64_t context,
      int64_t seed) const {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(
        static_cast<uint64_t>(seed * 1000003 + step + 1));
    const auto starts = torch::randint(
        ids.size(0) - context - 1, {size}, generator, torch::kLong);
    std::vector<torch::Tensor> xs;
    std::vector<torch::Tensor> ys;
    for (int64_t k = 0; k < size; ++k) {
      const int64_t at = starts[k].item<int64_t>();
      xs.push_back(ids.slice(0, at, at + context));
      ys.push_back(ids.slice(0, at + 1, at + context + 1));
    }
    return {torch::stack(xs), torch::stack(ys)};
  }
};

// ---------------------------------------------------------------------------
// The model: a Sequential, so that a pipe can cut it.
// ---------------------------------------------------------------------------

/// Token plus position embeddings.
struct EmbeddingsImpl : torch::nn::Module {
  EmbeddingsImpl(
      torch::nn::Embedding tokens_,
      int64_t context,
      int64_t width,
      double p)
      : tokens(register_module("tokens", std::move(tokens_))),
        positions(
            register_module("positions", torch::nn::Embedding(context, width))),
        dropout(register_module("dropout", torch::nn::Dropout(p))) {
    torch::NoGradGuard no_grad;
    positions->weight.normal_(0.0, 0.02); // GPT-2's, as the tokens'
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    const auto where = torch::arange(ids.size(1), ids.options());
    return dropout(tokens(ids) + positions(where));
  }
  torch::nn::Embedding tokens;
  torch::nn::Embedding positions;
  torch::nn::Dropout dropout;
};
TORCH_MODULE(Embeddings);

/// A pre-LN block: causal self-attention, then an MLP, each residual.
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t width, int64_t heads_, double p)
      : heads(heads_),
        attention_dropout(p),
        norm1(register_module(
            "norm1",
            torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})))),
        qkv(register_module("qkv", torch::nn::Linear(width, 3 * width))),
        project(register_module("project", torch::nn::Linear(width, width))),
        norm2(register_module(
            "norm2",
            torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})))),
        up(register_module("up", torch::nn::Linear(width, 4 * width))),
        down(register_module("down", torch::nn::Linear(4 * width, width))),
        dropout(register_module("dropout", torch::nn::Dropout(p))) {}
  torch::Tensor forward(torch::Tensor x) {
    const int64_t b = x.size(0);
    const int64_t t = x.size(1);
    const int64_t c = x.size(2);
    auto parts = qkv(norm1(x))
                     .view({b, t, 3, heads, c / heads})
                     .permute({2, 0, 3, 1, 4});
    auto attended = at::scaled_dot_product_attention(
        parts[0],
        parts[1],
        parts[2],
        std::nullopt,
        is_training() ? attention_dropout : 0.0,
        /*is_causal=*/true);
    x = x + dropout(project(attended.transpose(1, 2).reshape({b, t, c})));
    return x + dropout(down(torch::gelu(up(norm2(x)))));
  }
  int64_t heads;
  double attention_dropout;
  torch::nn::LayerNorm norm1;
  torch::nn::Linear qkv;
  torch::nn::Linear project;
  torch::nn::LayerNorm norm2;
  torch::nn::Linear up;
  torch::nn::Linear down;
  torch::nn::Dropout dropout;
};
TORCH_MODULE(Block);

/// The last LayerNorm and the logits, against the token embedding's own
/// weight (held as a submodule, so that the pipe sees the tie).
struct TiedHeadImpl : torch::nn::Module {
  TiedHeadImpl(torch::nn::Embedding tokens_, int64_t width)
      : norm(register_module(
            "norm",
            torch::nn::LayerNorm(torch::nn::LayerNormOptions({width})))),
        tokens(register_module("tokens", std::move(tokens_))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::matmul(norm(x), tokens->weight.t());
  }
  torch::nn::LayerNorm norm;
  torch::nn::Embedding tokens;
};
TORCH_MODULE(TiedHead);

torch::nn::Sequential make_gpt(const Flags& flags, int64_t vocabulary) {
  torch::manual_seed(static_cast<uint64_t>(flags.seed));
  torch::nn::Embedding tokens(vocabulary, flags.width);
  torch::nn::init::normal_(tokens->weight, 0.0, 0.02);
  torch::nn::Sequential gpt;
  gpt->push_back(Embeddings(tokens, flags.context, flags.width, flags.dropout));
  for (int64_t l = 0; l < flags.layers; ++l) {
    gpt->push_back(Block(flags.width, flags.heads, flags.dropout));
  }
  gpt->push_back(TiedHead(tokens, flags.width));
  return gpt;
}

torch::Tensor next_character_loss(
    const torch::Tensor& logits,
    const torch::Tensor& next) {
  return torch::nn::functional::cross_entropy(
      logits.reshape({-1, logits.size(-1)}).to(torch::kFloat32),
      next.reshape({-1}));
}

/// Warm-up, then cosine decay to a tenth.
double learning_rate(const Flags& flags, int64_t step) {
  if (step < flags.warmup) {
    return flags.lr * static_cast<double>(step + 1) /
        static_cast<double>(flags.warmup);
  }
  const double progress = static_cast<double>(step - flags.warmup) /
      static_cast<double>(std::max<int64_t>(1, flags.steps - flags.warmup));
  return flags.lr *
      (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * std::min(1.0, progress))));
}

/// Autocast for bf16 and fp16, on the flags' device type, for one scope.
struct Precision {
  Precision(const Flags& flags, torch::DeviceType device) : device_(device) {
    if (flags.precision == "fp32") {
      return;
    }
    enabled_ = true;
    previous_ = at::autocast::is_autocast_enabled(device_);
    at::autocast::set_autocast_enabled(device_, true);
    at::autocast::set_autocast_dtype(
        device_, flags.precision == "bf16" ? at::kBFloat16 : at::kHalf);
  }
  ~Precision() {
    if (enabled_) {
      at::autocast::set_autocast_enabled(device_, previous_);
      at::autocast::clear_cache();
    }
  }
  torch::DeviceType device_;
  bool enabled_ = false;
  bool previous_ = false;
};

int64_t peak_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

/// One optimizer step of either trainer: `run` returns the loss (scaled
/// when the scaler is on); clip, unscale and step follow.
struct Trainer {
  std::vector<torch::Tensor> parameters; // each once
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<gpipe::GradScaler> scaler;

  double step(
      const Flags& flags,
      int64_t at,
      const std::function<
          torch::Tensor(const gpipe::GradScaler::LossFunction&)>& run,
      const std::function<double(double)>& clip) {
    for (auto& group : optimizer->param_groups()) {
      group.options().set_lr(learning_rate(flags, at));
    }
    optimizer->zero_grad();
    const auto loss = run(scaler->scaled(next_character_loss));
    const double value = scaler->unscaled(loss).item<double>();
    scaler->unscale(*optimizer);
    if (flags.clip > 0) {
      clip(flags.clip);
    }
    scaler->step(*optimizer);
    scaler->update();
    return value;
  }
};

std::unique_ptr<torch::optim::Optimizer> adamw(
    std::vector<torch::Tensor> parameters,
    const Flags& flags) {
  return std::make_unique<torch::optim::AdamW>(
      std::move(parameters),
      torch::optim::AdamWOptions(flags.lr)
          .betas({0.9, 0.95})
          .weight_decay(0.1));
}

gpipe::GradScalerOptions scaler_options(const Flags& flags) {
  return gpipe::GradScalerOptions().enabled(flags.precision == "fp16");
}

/// Plain training of the same model on the same batches: the reference.
struct Plain {
  Plain(const Flags& flags, int64_t vocabulary, torch::Device device_)
      : model(make_gpt(flags, vocabulary)), device(device_) {
    model->to(device);
    trainer.parameters = gpipe::unique_parameters(*model);
    trainer.optimizer = adamw(trainer.parameters, flags);
    trainer.scaler = std::make_unique<gpipe::GradScaler>(scaler_options(flags));
  }

  double step(
      const Flags& flags,
      int64_t at,
      const torch::Tensor& x,
      const torch::Tensor& y) {
    return trainer.step(
        flags,
        at,
        [&](const auto& loss_fn) {
          const auto loss = loss_fn(model->forward(x.to(device)), y.to(device));
          loss.backward();
          return loss.detach();
        },
        [&](double max_norm) {
          return gpipe::clip_grad_norm(trainer.parameters, max_norm);
        });
  }

  torch::nn::Sequential model;
  torch::Device device;
  Trainer trainer;
};

// ---------------------------------------------------------------------------
// Checkpoints: every rank saves its own stages, optimizer, scaler and the
// generator, under a folder per step; `latest` names the newest complete one.
// ---------------------------------------------------------------------------

void save_checkpoint(
    const fs::path& folder,
    const std::string& name,
    torch::nn::Module& model,
    const torch::optim::Optimizer& optimizer,
    const gpipe::GradScaler& scaler) {
  fs::create_directories(folder);
  torch::serialize::OutputArchive archive;
  torch::serialize::OutputArchive model_archive;
  model.save(model_archive);
  archive.write("model", model_archive);
  torch::serialize::OutputArchive optimizer_archive;
  optimizer.save(optimizer_archive);
  archive.write("optimizer", optimizer_archive);
  torch::serialize::OutputArchive scaler_archive;
  scaler.save(scaler_archive);
  archive.write("scaler", scaler_archive);
  archive.write(
      "generator", at::detail::getDefaultCPUGenerator().get_state(), true);
  const auto file = folder / (name + ".pt");
  archive.save_to((file.string() + ".tmp"));
  fs::rename(file.string() + ".tmp", file);
}

void load_checkpoint(
    const fs::path& folder,
    const std::string& name,
    torch::nn::Module& model,
    torch::optim::Optimizer& optimizer,
    gpipe::GradScaler& scaler) {
  torch::serialize::InputArchive archive;
  archive.load_from((folder / (name + ".pt")).string());
  torch::serialize::InputArchive part;
  archive.read("model", part);
  model.load(part);
  archive.read("optimizer", part);
  optimizer.load(part);
  archive.read("scaler", part);
  scaler.load(part);
  torch::Tensor generator;
  archive.read("generator", generator, true);
  at::Generator global = at::detail::getDefaultCPUGenerator(); // a handle
  global.set_state(generator);
}

/// The step a run resumes at: one past the newest complete checkpoint.
int64_t resume_step(const Flags& flags) {
  std::ifstream latest(fs::path(flags.checkpoint_dir) / "latest");
  int64_t step = -1;
  return flags.checkpoint_every > 0 && (latest >> step) ? step + 1 : 0;
}

fs::path step_folder(const Flags& flags, int64_t step) {
  return fs::path(flags.checkpoint_dir) / ("step" + std::to_string(step));
}

void mark_latest(const Flags& flags, int64_t step) {
  const auto file = fs::path(flags.checkpoint_dir) / "latest";
  std::ofstream(file.string() + ".tmp") << step << "\n";
  fs::rename(file.string() + ".tmp", file);
}

// ---------------------------------------------------------------------------
// What it reports.
// ---------------------------------------------------------------------------

struct Curve {
  std::vector<int64_t> steps;
  std::vector<double> pipe;
  std::vector<double> plain; // NaN where plain did not run

  /// Adds a step, printed every `flags.every` steps when `print`.
  void add(
      const Flags& flags,
      int64_t step,
      double on_pipe,
      double on_plain,
      bool print) {
    steps.push_back(step);
    pipe.push_back(on_pipe);
    plain.push_back(on_plain);
    if (print && (step % flags.every == 0 || step + 1 == flags.steps)) {
      std::cout << std::setw(6) << step << std::fixed << std::setprecision(4)
                << std::setw(11) << on_pipe << std::setw(11) << on_plain
                << std::setw(11) << std::abs(on_pipe - on_plain)
                << std::setprecision(5) << std::setw(10)
                << learning_rate(flags, step) << "\n"
                << std::defaultfloat;
    }
  }
};

/// Seconds spent in `run`, added to `total`; returns what `run` returns.
template <typename Run>
double timed(double& total, const Run& run) {
  const auto start = std::chrono::steady_clock::now();
  const double value = run();
  total +=
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
          .count();
  return value;
}

/// The curves, one row per step, continued from an earlier attempt's rows
/// before `from`.
void write_curve(const Flags& flags, const Curve& curve, int64_t from) {
  const auto path = fs::path(flags.output) / "gpt_curve.csv";
  std::vector<std::string> kept;
  {
    std::ifstream earlier(path);
    std::string line;
    std::getline(earlier, line); // header
    while (std::getline(earlier, line)) {
      if (std::stoll(line.substr(0, line.find(','))) < from) {
        kept.push_back(line);
      }
    }
  }
  std::ofstream out(path);
  out << "step,pipe,plain\n";
  for (const auto& line : kept) {
    out << line << "\n";
  }
  out << std::setprecision(9);
  for (size_t k = 0; k < curve.steps.size(); ++k) {
    out << curve.steps[k] << "," << curve.pipe[k] << "," << curve.plain[k]
        << "\n";
  }
}

/// Both curves as an SVG picture.
void draw_curves(const Flags& flags, const Curve& curve) {
  if (curve.steps.empty()) {
    return;
  }
  double top = 0;
  double bottom = 1e9;
  for (const auto* line : {&curve.pipe, &curve.plain}) {
    for (const double v : *line) {
      if (std::isfinite(v)) {
        top = std::max(top, v);
        bottom = std::min(bottom, v);
      }
    }
  }
  const double width = 640;
  const double height = 320;
  const double margin = 50;
  const auto x_of = [&](int64_t step) {
    const double first = static_cast<double>(curve.steps.front());
    const double span =
        std::max(1.0, static_cast<double>(curve.steps.back()) - first);
    return margin +
        (static_cast<double>(step) - first) / span * (width - 2 * margin);
  };
  const auto y_of = [&](double v) {
    return height - margin -
        (v - bottom) / std::max(1e-9, top - bottom) * (height - 2 * margin);
  };
  std::ofstream svg(fs::path(flags.output) / "gpt_loss.svg");
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width
      << "\" height=\"" << height
      << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << margin
      << "\" y=\"20\">training loss (nats per character)"
      << " by step: plain (grey, wide) and the pipe (blue)</text>\n"
      << "<text x=\"5\" y=\"" << y_of(top) << "\">" << std::setprecision(3)
      << top << "</text>\n"
      << "<text x=\"5\" y=\"" << y_of(bottom) << "\">" << bottom << "</text>\n"
      << "<text x=\"" << margin << "\" y=\"" << height - 20 << "\">"
      << curve.steps.front() << "</text>\n<text x=\"" << width - margin
      << "\" y=\"" << height - 20 << "\">" << curve.steps.back() << "</text>\n";
  const auto polyline = [&](const std::vector<double>& values,
                            const char* style) {
    svg << "<polyline fill=\"none\" " << style << " points=\"";
    for (size_t k = 0; k < values.size(); ++k) {
      if (std::isfinite(values[k])) {
        svg << x_of(curve.steps[k]) << "," << y_of(values[k]) << " ";
      }
    }
    svg << "\"/>\n";
  };
  polyline(curve.plain, "stroke=\"#bbbbbb\" stroke-width=\"5\"");
  polyline(curve.pipe, "stroke=\"#1f5fbf\" stroke-width=\"1.5\"");
  svg << "</svg>\n";
}

/// Characters from `model` (a pipe or a plain Sequential), prompted.
template <typename Forward>
std::string generate(
    const Flags& flags,
    const Corpus& corpus,
    torch::nn::Module& model,
    const Forward& forward,
    const torch::Device& device) {
  torch::NoGradGuard no_grad;
  model.eval();
  std::string text = "In the beginning";
  auto generator = at::make_generator<at::CPUGeneratorImpl>(
      static_cast<uint64_t>(flags.seed + 7));
  for (int64_t k = 0; k < flags.sample; ++k) {
    std::vector<int64_t> ids;
    const size_t start = text.size() > static_cast<size_t>(flags.context)
        ? text.size() - static_cast<size_t>(flags.context)
        : 0;
    for (size_t i = start; i < text.size(); ++i) {
      ids.push_back(static_cast<int64_t>(corpus.alphabet.find(text[i])));
    }
    const auto input = torch::tensor(ids, torch::kLong).unsqueeze(0).to(device);
    const torch::Tensor logits = forward(input).select(1, -1).squeeze(0).to(
        torch::kCPU, torch::kFloat32);
    const torch::Tensor probabilities = torch::softmax(logits / 0.8, 0);
    const int64_t next =
        torch::multinomial(probabilities, 1, false, generator).item<int64_t>();
    text.push_back(corpus.alphabet[static_cast<size_t>(next)]);
  }
  model.train();
  return text;
}

void print_header() {
  std::cout << "  step  pipe loss plain loss       diff        lr\n";
}

/// The curves agree where both ran: every step within `tolerance`,
/// relative.
bool curves_agree(const Curve& curve, double tolerance) {
  double worst = 0;
  for (size_t k = 0; k < curve.steps.size(); ++k) {
    if (std::isfinite(curve.plain[k])) {
      worst = std::max(
          worst, std::abs(curve.pipe[k] - curve.plain[k]) / curve.plain[k]);
    }
  }
  std::cout << "largest relative difference between the curves: " << worst
            << "\n";
  return worst <= tolerance;
}

/// fp32 curves differ by the order of float sums only (200 steps: under
/// 1e-5 here); bf16 and fp16 round each micro-batch's products differently
/// (60 steps: 1e-4); dropout draws other masks for other micro-batch cuts,
/// so those curves agree only in trend.
double tolerance_of(const Flags& flags) {
  if (flags.dropout > 0) {
    return 0.1;
  }
  return flags.precision == "fp32" ? 1e-3 : 1e-2;
}

gpipe::Schedule schedule_of(const Flags& flags) {
  try {
    return gpipe::parse_schedule(flags.schedule);
  } catch (const c10::Error& e) {
    gpipe_example::usage_error(kProgram, e.what_without_backtrace());
  }
}

// ---------------------------------------------------------------------------
// One process: a pipe of K partitions beside plain training.
// ---------------------------------------------------------------------------

int run_one_process(const Flags& flags, const Corpus& corpus) {
  const torch::Device device(
      flags.device == "cuda" ? torch::kCUDA : torch::kCPU);
  if (device.is_cuda() && !torch::cuda::is_available()) {
    gpipe_example::usage_error(
        kProgram, "--device cuda, but no GPU is available");
  }
  Plain plain(flags, corpus.vocabulary(), device);
  auto seq = make_gpt(flags, corpus.vocabulary());
  std::vector<torch::Device> devices(
      static_cast<size_t>(flags.partitions), device);
  gpipe::GPipe<torch::nn::Sequential> pipe(
      seq,
      gpipe::GPipeOptions(flags.partitions)
          .microbatches(flags.microbatches)
          .checkpoint(flags.checkpoint)
          .schedule(schedule_of(flags))
          .devices(devices)
          .concurrent_cpu_partitions(true));
  std::cout << "gpt: " << corpus.ids.size(0) << " characters of " << flags.text
            << ", " << corpus.vocabulary() << " distinct; "
            << gpipe::unique_parameters(*seq).size() << " tensors, " <<
      [&] {
        int64_t n = 0;
        for (const auto& p : gpipe::unique_parameters(*seq)) {
          n += p.numel();
        }
        return n;
      }() << " parameters\n";
  pipe->pretty_print(std::cout);
  std::cout << "\n\n";
  Trainer piped{gpipe::unique_parameters(*pipe), nullptr, nullptr};
  piped.optimizer = adamw(piped.parameters, flags);
  piped.scaler = std::make_unique<gpipe::GradScaler>(scaler_options(flags));
  Curve curve;
  double pipe_seconds = 0;
  print_header();
  for (int64_t step = 0; step < flags.steps; ++step) {
    const auto [x, y] =
        corpus.batch(step, flags.batch, flags.context, flags.seed);
    Precision precision(flags, device.type());
    const double plain_loss =
        flags.compare ? plain.step(flags, step, x, y) : std::nan("");
    const double pipe_loss = timed(pipe_seconds, [&] {
      return piped.step(
          flags,
          step,
          [&](const auto& loss_fn) { return pipe->step(x, y, loss_fn); },
          [&](double max_norm) {
            return gpipe::clip_grad_norm(*pipe, max_norm);
          });
    });
    curve.add(flags, step, pipe_loss, plain_loss, /*print=*/true);
  }
  fs::create_directories(flags.output);
  write_curve(flags, curve, 0);
  draw_curves(flags, curve);
  std::cout << "\npipe: " << std::setprecision(4)
            << static_cast<double>(flags.steps * flags.batch * flags.context) /
          pipe_seconds
            << " tokens/s; peak RSS " << peak_rss_kib() / 1024 << " MiB\n"
            << "curves: " << (fs::path(flags.output) / "gpt_curve.csv").string()
            << ", " << (fs::path(flags.output) / "gpt_loss.svg").string()
            << "\n";
  if (flags.sample > 0) {
    std::cout << "\nthe pipe writes:\n"
              << generate(
                     flags,
                     corpus,
                     *pipe,
                     [&](const torch::Tensor& ids) { return pipe(ids); },
                     device)
              << "\n\n";
  }
  if (flags.compare && !curves_agree(curve, tolerance_of(flags))) {
    std::cout << "FAIL: the pipe's curve left plain training's\n";
    return 1;
  }
  return 0;
}

// ---------------------------------------------------------------------------
// Across processes, under torchrun.
// ---------------------------------------------------------------------------

#if GPIPE_EXAMPLE_DISTRIBUTED
namespace gd = gpipe::distributed;

/// Names in a flat archive: TorchScript attribute names take no dots.
std::string archive_key(const std::string& name) {
  std::string key;
  for (const char c : name) {
    key += c == '.' ? std::string("__") : std::string(1, c);
  }
  return key;
}

void barrier(gd::World& world) {
  auto token = torch::zeros({1});
  std::vector<torch::Tensor> tensors{token};
  world.group()->allreduce(tensors)->wait();
}

/// Rank 0's JSON line: the median step and every rank's peak RSS.
void print_json(
    const Flags& flags,
    gd::World& world,
    const gd::DistributedGPipeImpl& pipe,
    std::vector<double> step_seconds) {
  auto rss = torch::zeros({world.size()}, torch::kFloat64);
  rss[world.rank()] = static_cast<double>(peak_rss_kib()) / 1024.0;
  std::vector<torch::Tensor> tensors{rss};
  world.group()->allreduce(tensors)->wait();
  if (world.rank() != 0 || step_seconds.empty()) {
    return;
  }
  std::sort(step_seconds.begin(), step_seconds.end());
  const size_t n = step_seconds.size();
  const double median = n % 2 == 1
      ? step_seconds[n / 2]
      : 0.5 * (step_seconds[n / 2 - 1] + step_seconds[n / 2]);
  std::vector<std::string> rss_mb;
  for (int64_t r = 0; r < world.size(); ++r) {
    std::ostringstream mb;
    mb << std::fixed << std::setprecision(1) << rss[r].item<double>();
    rss_mb.push_back(mb.str());
  }
  std::cout << "{\"impl\":\"gpipe\",\"model\":\"gpt\",\"schedule\":\""
            << flags.schedule << "\",\"layers\":" << flags.layers
            << ",\"stages\":" << pipe.stages()
            << ",\"ties\":" << pipe.ties().size()
            << ",\"replica_bucket_bytes\":" << flags.replica_bucket_bytes
            << ",\"timed_steps\":" << n << ",\"step_ms_median\":" << std::fixed
            << std::setprecision(3) << 1e3 * median << ",\"peak_rss_mb\":["
            << c10::Join(",", rss_mb) << "]}" << std::defaultfloat << std::endl;
}

int run_distributed(const Flags& flags, const Corpus& corpus) {
  auto world = gd::World::connect();
  const int64_t stages = flags.stages == 0 ? world->size() : flags.stages;
  const gpipe::Schedule schedule = schedule_of(flags);
  auto options = gd::DistributedOptions(stages)
                     .microbatches(flags.microbatches)
                     .schedule(schedule)
                     .checkpoint(flags.checkpoint)
                     .stages_per_rank(gpipe::stages_per_lane(schedule))
                     .replica_bucket_bytes(flags.replica_bucket_bytes);
  if (flags.device == "cuda") {
    options.device(torch::kCUDA).backend(gd::Backend::Gloo);
  }
  gd::DistributedGPipe pipe(
      world, make_gpt(flags, corpus.vocabulary()), options);
  const torch::Device device = pipe->options.device();
  const bool rank0 = world->rank() == 0;
  const bool compare = flags.compare && rank0;
  const int64_t replicas = pipe->replicas();
  if (flags.batch % replicas != 0 && rank0) {
    std::cout << "note: " << flags.batch << " samples split unevenly over "
              << replicas << " replicas\n";
  }
  Trainer piped{gpipe::unique_parameters(*pipe), nullptr, nullptr};
  if (flags.zero) {
    piped.optimizer = std::make_unique<gd::ShardedOptimizer>(
        *pipe, [&](std::vector<torch::Tensor> shard) {
          return adamw(std::move(shard), flags);
        });
  } else {
    piped.optimizer = adamw(piped.parameters, flags);
  }
  piped.scaler = std::make_unique<gd::GradScaler>(world, scaler_options(flags));
  Plain plain(flags, corpus.vocabulary(), device);
  const std::string rank_name = "rank" + std::to_string(world->rank());
  const int64_t first = resume_step(flags);
  if (first > 0) {
    load_checkpoint(
        step_folder(flags, first - 1),
        rank_name,
        *pipe,
        *piped.optimizer,
        *piped.scaler);
    if (compare) {
      load_checkpoint(
          step_folder(flags, first - 1),
          "plain",
          *plain.model,
          *plain.trainer.optimizer,
          *plain.trainer.scaler);
    }
  }
  if (rank0) {
    std::cout << "gpt across " << world->size() << " ranks: " << stages
              << " stages x " << replicas << " replicas, "
              << gpipe::to_string(schedule)
              << (flags.zero ? ", optimizer state sharded (ZeRO-1)" : "")
              << "; attempt " << world->attempt()
              << (first > 0
                      ? ", resumed after step " + std::to_string(first - 1)
                      : std::string())
              << "; ties: " << pipe->ties().size() << "\n";
    print_header();
  }
  Curve curve;
  double pipe_seconds = 0;
  std::vector<double> step_seconds; // after --untimed
  for (int64_t step = first; step < flags.steps; ++step) {
    if (step == flags.kill_at_step && world->attempt() == 0 &&
        world->rank() == world->size() - 1) {
      std::cout << "rank " << world->rank() << " kills itself before step "
                << step << std::endl;
      std::raise(SIGKILL);
    }
    const auto [x, y] =
        corpus.batch(step, flags.batch, flags.context, flags.seed);
    Precision precision(flags, device.type());
    const double plain_loss =
        compare ? plain.step(flags, step, x, y) : std::nan("");
    double seconds = 0;
    const double pipe_loss = timed(seconds, [&] {
      return piped.step(
          flags,
          step,
          [&](const auto& loss_fn) {
            return pipe->step(
                torch::tensor_split(x, replicas)[pipe->replica()],
                torch::tensor_split(y, replicas)[pipe->replica()],
                loss_fn);
          },
          [&](double max_norm) { return gd::clip_grad_norm(pipe, max_norm); });
    });
    pipe_seconds += seconds;
    if (step - first >= flags.untimed_steps) {
      step_seconds.push_back(seconds);
    }
    curve.add(flags, step, pipe_loss, plain_loss, /*print=*/rank0);
    if (flags.checkpoint_every > 0 &&
        (step + 1) % flags.checkpoint_every == 0) {
      save_checkpoint(
          step_folder(flags, step),
          rank_name,
          *pipe,
          *piped.optimizer,
          *piped.scaler);
      if (compare) {
        save_checkpoint(
            step_folder(flags, step),
            "plain",
            *plain.model,
            *plain.trainer.optimizer,
            *plain.trainer.scaler);
      }
      barrier(*world);
      if (rank0) {
        mark_latest(flags, step);
      }
    }
  }
  // Per rank: tokens per second of its replica, and its peak memory.
  const double tokens =
      static_cast<double>((flags.steps - first) * flags.batch * flags.context);
  std::cout << "rank " << world->rank() << ": " << std::setprecision(4)
            << tokens / pipe_seconds << " tokens/s, peak RSS "
            << peak_rss_kib() / 1024 << " MiB, optimizer state "
            << gd::optimizer_state_bytes(
                   flags.zero
                       ? dynamic_cast<gd::ShardedOptimizer&>(*piped.optimizer)
                             .shard_optimizer()
                       : *piped.optimizer) /
          1024
            << " KiB" << std::endl;
  if (flags.json) {
    print_json(flags, *world, *pipe, step_seconds);
  }
  // The whole model from replica 0's ranks, whose archives together hold
  // it under the Sequential's names, for rank 0 to write with.
  const auto final_folder = fs::path(flags.checkpoint_dir) / "final";
  if (pipe->replica() == 0) {
    fs::create_directories(final_folder);
    torch::serialize::OutputArchive archive;
    for (const auto& p : pipe->named_parameters()) {
      archive.write(archive_key(p.key()), p.value());
    }
    archive.save_to((final_folder / (rank_name + ".pt")).string());
  }
  barrier(*world);
  int status = 0;
  if (rank0) {
    fs::create_directories(flags.output);
    write_curve(flags, curve, first);
    draw_curves(flags, curve);
    if (flags.sample > 0) {
      auto whole = make_gpt(flags, corpus.vocabulary());
      torch::NoGradGuard no_grad;
      for (int64_t r = 0; r < stages; ++r) {
        torch::serialize::InputArchive archive;
        archive.load_from(
            (final_folder / ("rank" + std::to_string(r) + ".pt")).string());
        for (auto& p : whole->named_parameters()) {
          torch::Tensor saved;
          if (archive.try_read(archive_key(p.key()), saved)) {
            p.value().copy_(saved);
          }
        }
      }
      whole->to(device);
      std::cout << "\nthe pipe's weights write:\n"
                << generate(
                       flags,
                       corpus,
                       *whole,
                       [&](const torch::Tensor& ids) {
                         return whole->forward(ids);
                       },
                       device)
                << "\n\n";
    }
    if (compare && !curves_agree(curve, tolerance_of(flags))) {
      std::cout << "FAIL: the pipe's curve left plain training's\n";
      status = 1;
    }
  }
  return status;
}
#endif // GPIPE_EXAMPLE_DISTRIBUTED

} // namespace

int main(int argc, char** argv) {
  const Flags flags = parse_flags(argc, argv);
  const Corpus corpus = Corpus::read(flags.text);
  try {
    if (!flags.distributed) {
      return run_one_process(flags, corpus);
    }
#if GPIPE_EXAMPLE_DISTRIBUTED
    torch::set_num_threads(1);
    return run_distributed(flags, corpus);
#else
    gpipe_example::usage_error(
        kProgram,
        "--distributed 1 needs a build with Gloo's headers (gpipe::distributed)");
#endif
  } catch (const std::exception& e) {
    // A failed rank exits non-zero, so that torchrun restarts the job.
    std::cerr << "gpt: " << e.what() << std::endl;
    return 1;
  }
}
