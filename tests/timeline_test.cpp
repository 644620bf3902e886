// The timeline a pipe records and its Chrome trace: a slice for every cell
// and phase, and JSON a trace viewer can open.
#include "test_support.h"

#include <gpipe/trace.h>

#include <cctype>
#include <map>
#include <memory>
#include <set>
#include <tuple>

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Phase;
using gpipe::TimelineEvent;

namespace {

/// A JSON value, enough of one to check a trace.
struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  double number = 0;
  std::string text;
  std::vector<Json> items;
  std::map<std::string, Json> fields;

  const Json& at(const std::string& key) const {
    const auto found = fields.find(key);
    if (found == fields.end()) {
      throw std::runtime_error("missing key " + key);
    }
    return found->second;
  }
};

/// A strict little JSON parser: throws on anything malformed.
class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : text_(text) {}

  Json parse() {
    Json value = parse_value();
    skip_space();
    expect(pos_ == text_.size(), "trailing characters");
    return value;
  }

 private:
  void expect(bool ok, const char* what) const {
    if (!ok) {
      throw std::runtime_error(
          std::string(what) + " at offset " + std::to_string(pos_));
    }
  }
  void skip_space() {
    while (pos_ < text_.size() &&
           std::isspace(static_cast<unsigned char>(text_[pos_]))) {
      ++pos_;
    }
  }
  bool take(char c) {
    skip_space();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool take_word(const char* word) {
    const std::string w(word);
    if (text_.compare(pos_, w.size(), w) == 0) {
      pos_ += w.size();
      return true;
    }
    return false;
  }
  std::string parse_string() {
    expect(take('"'), "expected a string");
    std::string out;
    while (true) {
      expect(pos_ < text_.size(), "unterminated string");
      const char c = text_[pos_++];
      if (c == '"') {
        return out;
      }
      expect(
          static_cast<unsigned char>(c) >= 0x20,
          "raw control character in a string");
      if (c != '\\') {
        out.push_back(c);
        continue;
      }
      expect(pos_ < text_.size(), "unterminated escape");
      const char e = text_[pos_++];
      const std::string simple = "\"\\/bfnrt";
      if (e == 'u') {
        expect(pos_ + 4 <= text_.size(), "short \\u escape");
        for (int k = 0; k < 4; ++k) {
          expect(
              std::isxdigit(static_cast<unsigned char>(text_[pos_ + k])),
              "bad \\u escape");
        }
        out.push_back(
            static_cast<char>(std::stoi(text_.substr(pos_, 4), nullptr, 16)));
        pos_ += 4;
      } else {
        expect(simple.find(e) != std::string::npos, "bad escape");
        out.push_back(
            e == 'n'       ? '\n'
                : e == 't' ? '\t'
                : e == 'r' ? '\r'
                : e == 'b' ? '\b'
                : e == 'f' ? '\f'
                           : e);
      }
    }
  }
  Json parse_value() {
    skip_space();
    expect(pos_ < text_.size(), "unexpected end");
    Json value;
    const char c = text_[pos_];
    if (c == '{') {
      ++pos_;
      value.kind = Json::Object;
      if (take('}')) {
        return value;
      }
      do {
        skip_space();
        const std::string key = parse_string();
        expect(take(':'), "expected ':'");
        value.fields[key] = parse_value();
      } while (take(','));
      expect(take('}'), "expected '}'");
    } else if (c == '[') {
      ++pos_;
      value.kind = Json::Array;
      if (take(']')) {
        return value;
      }
      do {
        value.items.push_back(parse_value());
      } while (take(','));
      expect(take(']'), "expected ']'");
    } else if (c == '"') {
      value.kind = Json::String;
      value.text = parse_string();
    } else if (take_word("true") || take_word("false")) {
      value.kind = Json::Bool;
    } else if (take_word("null")) {
      value.kind = Json::Null;
    } else {
      const size_t start = pos_;
      if (text_[pos_] == '-') {
        ++pos_;
      }
      expect(
          pos_ < text_.size() &&
              std::isdigit(static_cast<unsigned char>(text_[pos_])),
          "bad number");
      while (pos_ < text_.size() &&
             (std::isdigit(static_cast<unsigned char>(text_[pos_])) ||
              std::string(".eE+-").find(text_[pos_]) != std::string::npos)) {
        ++pos_;
      }
      value.kind = Json::Number;
      value.number = std::stod(text_.substr(start, pos_ - start));
    }
    return value;
  }

  const std::string& text_;
  size_t pos_ = 0;
};

/// One training step of a K-partition, M-micro-batch pipe with a timeline.
std::vector<TimelineEvent> record_step(
    int64_t partitions,
    int64_t microbatches,
    Checkpoint mode) {
  auto seq = gpipe_test::make_mlp(/*layers=*/4, /*width=*/8);
  GPipe<torch::nn::Sequential> pipe(
      seq,
      GPipeOptions(partitions).microbatches(microbatches).checkpoint(mode));
  auto timeline = std::make_shared<gpipe::Timeline>();
  pipe->set_timeline(timeline);
  const auto x = torch::randn({16, 8});
  torch::mse_loss(pipe(x), torch::zeros({16, 8})).backward();
  return timeline->events();
}

using Cell = std::tuple<int64_t, int64_t, Phase>;

std::map<Cell, int> count_cells(const std::vector<TimelineEvent>& events) {
  std::map<Cell, int> counts;
  for (const auto& event : events) {
    ++counts[{event.partition, event.microbatch, event.phase}];
  }
  return counts;
}

} // namespace

TEST(
    Timeline,
    NeverCheckpointingRecordsOneForwardAndOneBackwardPerCellAndNoRecompute) {
  const auto events = record_step(4, 4, Checkpoint::Never);
  const auto counts = count_cells(events);
  for (int64_t i = 0; i < 4; ++i) {
    for (int64_t j = 0; j < 4; ++j) {
      EXPECT_EQ(
          counts.count({j, i, Phase::Forward})
              ? counts.at({j, i, Phase::Forward})
              : 0,
          1);
      EXPECT_EQ(
          counts.count({j, i, Phase::Backward})
              ? counts.at({j, i, Phase::Backward})
              : 0,
          1);
    }
  }
  for (const auto& event : events) {
    EXPECT_NE(event.phase, Phase::Recompute);
    EXPECT_LE(event.start_us, event.end_us);
  }
}

TEST(Timeline, AlwaysCheckpointingRecordsARecomputeBeforeEveryBackward) {
  const auto events = record_step(3, 4, Checkpoint::Always);
  const auto counts = count_cells(events);
  for (int64_t i = 0; i < 4; ++i) {
    for (int64_t j = 0; j < 3; ++j) {
      for (const auto phase :
           {Phase::Forward, Phase::Recompute, Phase::Backward}) {
        EXPECT_EQ(counts.count({j, i, phase}) ? counts.at({j, i, phase}) : 0, 1)
            << "partition " << j << " micro-batch " << i << " "
            << gpipe::to_string(phase);
      }
    }
  }
  for (const auto& r : events) {
    if (r.phase != Phase::Recompute) {
      continue;
    }
    for (const auto& b : events) {
      if (b.phase == Phase::Backward && b.partition == r.partition &&
          b.microbatch == r.microbatch) {
        EXPECT_LE(r.end_us, b.start_us);
      }
    }
  }
}

TEST(
    Timeline,
    ExceptLastCheckpointingSkipsTheRecomputeOfTheLastMicrobatchOnly) {
  const auto counts = count_cells(record_step(2, 4, Checkpoint::ExceptLast));
  for (int64_t j = 0; j < 2; ++j) {
    for (int64_t i = 0; i < 3; ++i) {
      EXPECT_EQ(counts.count({j, i, Phase::Recompute}), 1u)
          << "partition " << j << " micro-batch " << i;
    }
    EXPECT_EQ(counts.count({j, 3, Phase::Recompute}), 0u) << "partition " << j;
  }
}

TEST(Trace, JsonStringsEscapeQuotesBackslashesAndControlCharacters) {
  EXPECT_EQ(
      gpipe::detail::json_string("a\"b\\c\nd\x01"),
      "\"a\\\"b\\\\c\\nd\\u0001\"");
  EXPECT_EQ(gpipe::detail::json_number(12.5), "12.5");
  EXPECT_EQ(gpipe::detail::json_number(3.0), "3");
  EXPECT_EQ(gpipe::detail::json_number(std::nan("")), "null");
}

TEST(
    Trace,
    ChromeTraceOfARealStepParsesAndHasOneSlicePerPartitionMicrobatchAndPhase) {
  const int64_t partitions = 3;
  const int64_t microbatches = 4;
  const auto events = record_step(partitions, microbatches, Checkpoint::Always);
  const auto json = gpipe::chrome_trace_json(events);
  Json trace;
  ASSERT_NO_THROW(trace = JsonParser(json).parse()) << json;
  ASSERT_EQ(trace.kind, Json::Object);
  const auto& trace_events = trace.at("traceEvents");
  ASSERT_EQ(trace_events.kind, Json::Array);

  std::map<Cell, int> slices;
  std::set<std::string> thread_names;
  size_t complete = 0;
  for (const auto& event : trace_events.items) {
    const auto& ph = event.at("ph").text;
    if (ph == "M") {
      if (event.at("name").text == "thread_name") {
        thread_names.insert(event.at("args").at("name").text);
      }
      continue;
    }
    ASSERT_EQ(ph, "X");
    ++complete;
    const auto& args = event.at("args");
    const auto partition = static_cast<int64_t>(args.at("partition").number);
    const auto microbatch = static_cast<int64_t>(args.at("microbatch").number);
    const auto& phase = args.at("phase").text;
    EXPECT_EQ(event.at("tid").number, args.at("partition").number);
    EXPECT_EQ(event.at("pid").number, 1); // the one device, the CPU
    EXPECT_GE(event.at("dur").number, 0);
    const Phase parsed = phase == "forward" ? Phase::Forward
        : phase == "backward"               ? Phase::Backward
        : phase == "recompute"              ? Phase::Recompute
                                            : Phase::Copy;
    EXPECT_EQ(event.at("name").text, gpipe::slice_name(parsed, microbatch));
    ++slices[{partition, microbatch, parsed}];
  }
  EXPECT_EQ(complete, events.size());
  EXPECT_EQ(slices.size(), static_cast<size_t>(partitions * microbatches * 3));
  for (const auto& slice : slices) {
    EXPECT_EQ(slice.second, 1);
  }
  EXPECT_EQ(
      thread_names,
      (std::set<std::string>{"partition 0", "partition 1", "partition 2"}));
}

TEST(Trace, ChromeTraceOfNoEventsIsAnEmptyValidTrace) {
  const auto trace = JsonParser(gpipe::chrome_trace_json({})).parse();
  EXPECT_TRUE(trace.at("traceEvents").items.empty());
}
