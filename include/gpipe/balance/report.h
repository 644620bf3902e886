// What a balance costs, readably: per layer, per partition, how uneven, and
// the step time the costs predict.
//
// Why apart from the solver: a balance is a judgement call as often as a
// computation (a device shared with other work, a budget with a margin), and
// the report is how a user checks one, whether it came from
// `balance_by_time`, `balance_by_memory` or their own hands.
#pragma once

#include <gpipe/balance/memory_model.h>
#include <gpipe/balance/split.h>
#include <gpipe/detail/partition.h>
#include <gpipe/options.h>
#include <gpipe/schedule.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {
namespace detail {

/// "12.3 ms", "4.50 MB": a cost in a readable unit ("s" or "B").
inline std::string format_cost(double value, const std::string& unit) {
  std::ostringstream out;
  out << std::fixed;
  if (unit == "s") {
    if (value >= 1.0) {
      out << std::setprecision(3) << value << " s";
    } else if (value >= 1e-3) {
      out << std::setprecision(3) << value * 1e3 << " ms";
    } else {
      out << std::setprecision(1) << value * 1e6 << " us";
    }
  } else if (unit == "B") {
    if (value >= 1e9) {
      out << std::setprecision(2) << value / 1e9 << " GB";
    } else if (value >= 1e6) {
      out << std::setprecision(2) << value / 1e6 << " MB";
    } else if (value >= 1e3) {
      out << std::setprecision(1) << value / 1e3 << " kB";
    } else {
      out << std::setprecision(0) << value << " B";
    }
  } else {
    out << std::setprecision(4) << value;
    if (!unit.empty()) {
      out << " " << unit;
    }
  }
  return out.str();
}

} // namespace detail

/// What a balance costs: per layer, per partition, and how uneven it is.
/// Print it with `<<`.
struct BalanceReport {
  /// "s" (seconds) or "B" (bytes); anything else prints as is.
  std::string unit;
  /// Each layer's cost, in the Sequential's order.
  std::vector<double> layer_costs;
  /// Layers per partition.
  std::vector<int64_t> balance;
  /// Each partition's cost (for memory, including what a partition keeps at
  /// its ends, so not always the sum of its layers').
  std::vector<double> partition_costs;
  /// A line printed under the table; empty: none.
  std::string note;

  /// The slowest (largest) partition's cost: what bounds the pipe.
  double max_cost() const {
    return *std::max_element(partition_costs.begin(), partition_costs.end());
  }

  /// The partitions' mean cost: what a perfect balance would give each.
  double mean_cost() const {
    double sum = 0;
    for (const double cost : partition_costs) {
      sum += cost;
    }
    return sum / static_cast<double>(partition_costs.size());
  }

  /// max / mean: 1 is perfectly even; a pipe runs at max, so 1.5 means a
  /// third of every step is spent waiting.
  double imbalance() const {
    const double mean = mean_cost();
    return mean > 0 ? max_cost() / mean : 1.0;
  }
};

inline std::ostream& operator<<(std::ostream& os, const BalanceReport& report) {
  os << "balance [";
  for (size_t j = 0; j < report.balance.size(); ++j) {
    os << (j ? ", " : "") << report.balance[j];
  }
  os << "] (" << report.layer_costs.size() << " layers, "
     << report.balance.size() << " partitions)\n";
  os << "  partition  layers        cost          layer costs\n";
  size_t l = 0;
  for (size_t j = 0; j < report.balance.size(); ++j) {
    const size_t begin = l;
    const size_t end = l + static_cast<size_t>(report.balance[j]);
    std::ostringstream layers;
    layers << begin << "-" << end - 1;
    // Eight layer costs a line, continued under the first.
    std::ostringstream costs;
    for (l = begin; l < end; ++l) {
      if (l > begin) {
        costs << ((l - begin) % 8 == 0 ? ",\n" + std::string(41, ' ') : ", ");
      }
      costs << detail::format_cost(report.layer_costs[l], report.unit);
    }
    os << "  " << std::setw(9) << j << "  " << std::left << std::setw(12)
       << layers.str() << "  " << std::setw(12)
       << detail::format_cost(report.partition_costs[j], report.unit)
       << std::right << "  " << costs.str() << "\n";
  }
  os << "  max " << detail::format_cost(report.max_cost(), report.unit)
     << ", mean " << detail::format_cost(report.mean_cost(), report.unit)
     << ", imbalance (max/mean) " << std::fixed << std::setprecision(2)
     << report.imbalance() << std::defaultfloat << "\n";
  if (!report.note.empty()) {
    os << "  " << report.note << "\n";
  }
  return os;
}

/// The report of `balance` for additive per-layer costs, e.g. the seconds of
/// `profile_times` (unit "s").
inline BalanceReport balance_report(
    const std::vector<double>& layer_costs,
    const std::vector<int64_t>& balance,
    std::string unit = "s") {
  detail::check_costs(layer_costs);
  BalanceReport report;
  report.unit = std::move(unit);
  report.layer_costs = layer_costs;
  report.balance = detail::resolve_balance(
      static_cast<int64_t>(layer_costs.size()),
      static_cast<int64_t>(balance.size()),
      balance);
  size_t l = 0;
  for (const int64_t size : report.balance) {
    double sum = 0;
    for (int64_t k = 0; k < size; ++k, ++l) {
      sum += layer_costs[l];
    }
    report.partition_costs.push_back(sum);
  }
  return report;
}

/// The report of `balance` in bytes for the memory of `profile_memory`:
/// each layer's own bytes (parameters, gradients, optimizer state, buffers
/// and one micro-batch's graph) and each partition's bytes as the pipe keeps
/// them (Note [What a partition keeps]).
inline BalanceReport balance_report(
    const std::vector<LayerMemory>& layers,
    const std::vector<int64_t>& balance,
    Checkpoint checkpoint,
    int64_t microbatches,
    const MemoryOptions& options = {}) {
  const detail::MemoryModel model(
      layers,
      static_cast<int64_t>(std::max<size_t>(balance.size(), 1)),
      checkpoint,
      microbatches,
      options);
  BalanceReport report;
  report.unit = "B";
  for (int64_t l = 0; l < model.layers(); ++l) {
    report.layer_costs.push_back(model.layer_bytes(l));
  }
  report.balance = balance;
  for (const int64_t bytes :
       partition_memory(layers, balance, checkpoint, microbatches, options)) {
    report.partition_costs.push_back(static_cast<double>(bytes));
  }
  std::ostringstream note;
  note << "partition bytes: checkpoint " << checkpoint << ", " << microbatches
       << " micro-batches, " << options.schedule() << ", optimizer factor "
       << options.optimizer_factor()
       << "; layer costs count one micro-batch's activations";
  report.note = note.str();
  return report;
}

/// The step time that per-partition costs predict for fill-drain with m
/// micro-batches, as gpipe runs it: clock ticks in lockstep (forward ticks,
/// then backward ticks), each as long as its slowest active partition.
/// With forward + backward costs from `profile_times` this is
///   sum over the m + n - 1 ticks k of max { cost[j] : 0 <= k - j < m },
/// exact when every partition's forward : backward ratio is the same.
inline double predicted_step_time(
    const std::vector<double>& partition_costs,
    int64_t microbatches) {
  detail::check_costs(partition_costs);
  const auto n = static_cast<int64_t>(partition_costs.size());
  TORCH_CHECK(
      n >= 1,
      "gpipe: predicted_step_time needs at least one partition (partitions: 0)");
  double total = 0;
  for (const auto& tick : clock_cycles(microbatches, n)) {
    double slowest = 0;
    for (const auto& cell : tick) {
      slowest =
          std::max(slowest, partition_costs[static_cast<size_t>(cell.second)]);
    }
    total += slowest;
  }
  return total;
}

} // namespace gpipe
