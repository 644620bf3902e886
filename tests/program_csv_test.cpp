// program_csv.h: pipelining's CSV schedule files read and written. The
// literal files below are what torch.distributed.pipelining 2.11 writes
// (_dump_csv, or csv.writer on pipeline_order for its single-stage classes,
// which have no _dump_csv), pasted as its csv module wrote them, "\r\n" and
// all.
#include "test_support.h"

#include <gpipe/program.h>
#include <gpipe/program_csv.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace program_csv_test {

using gpipe::ProgramFormat;

namespace {

constexpr ProgramFormat kComputeOnly = ProgramFormat::PipeliningComputeOnly;
constexpr ProgramFormat kComputeComms = ProgramFormat::PipeliningComputeComms;

// ScheduleLoopedBFS, 2 ranks, 1 stage each, 2 micro-batches: compute_only,
// idle steps as empty cells.
const char* const kLoopedBfsComputeOnly =
    "0F0,0F1,,,0B1,0B0\r\n"
    ",1F0,1F1,1B1,1B0\r\n";

// ScheduleInterleaved1F1B, 2 ranks, 2 stages each, 2 micro-batches:
// compute_comms, with pipelining's FSDP actions and early receives (3RECV_F1
// before 3B0, whose F it does not feed).
const char* const kInterleavedComputeComms =
    "0UNSHARD,2UNSHARD,0F0,0SEND_F0,2RECV_F0,0F1,0SEND_F1,2RECV_F1,2F0,2SEND_F0,2F1,2SEND_F1,2RECV_B0,2B0,2SEND_B0,2RECV_B1,2B1,2SEND_B1,2REDUCE_GRAD,2RESHARD,0RECV_B0,0B0,0RECV_B1,0B1,0REDUCE_GRAD,0RESHARD\r\n"
    "1UNSHARD,3UNSHARD,1RECV_F0,1F0,1SEND_F0,1RECV_F1,1F1,1SEND_F1,3RECV_F0,3F0,3RECV_F1,3B0,3SEND_B0,1RECV_B0,3F1,3B1,3SEND_B1,1RECV_B1,3REDUCE_GRAD,3RESHARD,1B0,1SEND_B0,1B1,1SEND_B1,1REDUCE_GRAD,1RESHARD\r\n";

// ScheduleGPipe, 2 ranks, 2 micro-batches: its pipeline_order, REDUCE_GRAD
// after each rank's last backward.
const char* const kGPipeOrder =
    "0F0,0F1,0B0,0B1,0REDUCE_GRAD\r\n"
    "1F0,1F1,1B0,1B1,1REDUCE_GRAD\r\n";

// Schedule1F1B, 2 ranks, 2 micro-batches: its pipeline_order numbers the
// last rank's forwards from 1 (a fault of _get_pipeline_order, which
// pipelining's own _validate_schedule also rejects).
const char* const kOneFOneBOrder =
    "0F0,0F1,0B0,0B1,0REDUCE_GRAD\r\n"
    "1F1,1B0,1F2,1B1,1REDUCE_GRAD\r\n";

// ScheduleDualPipeV, 2 ranks, 2 stages each in a V, 4 micro-batches:
// compute_only, with OVERLAP_F_B pairs.
const char* const kDualPipeVComputeOnly =
    "0F0,0F1,0F2,3F0,3I0,3W0,3F1,(0F3;3B1)OVERLAP_F_B,(3F2;0B0)OVERLAP_F_B,3B2,(3F3;0B1)OVERLAP_F_B,3B3,0I2,0W2,0I3,0W3\r\n"
    "1F0,2F0,1F1,2F1,1F2,2B0,(2F2;1B0)OVERLAP_F_B,(1F3;2B1)OVERLAP_F_B,(2F3;1B1)OVERLAP_F_B,2B2,1B2,2I3,1I3,2W3,1W3\r\n";

bool starts_with(const std::string& text, const std::string& prefix) {
  return text.rfind(prefix, 0) == 0;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string error_of_parse(const std::string& text, ProgramFormat format) {
  return gpipe_test::error_of([&] { gpipe::parse_program(text, format); });
}

/// Parses `csv` in `format`, expects its placement and its gpipe text, and
/// that simulate accepts it.
void expect_reads_as(
    const std::string& csv,
    ProgramFormat format,
    const std::vector<int64_t>& lane_of_stage,
    const std::string& text) {
  const gpipe::Program program = gpipe::parse_program(csv, format);
  EXPECT_EQ(program.lane_of_stage, lane_of_stage);
  EXPECT_EQ(gpipe::format_program(program), text);
  EXPECT_NO_THROW(gpipe::simulate(program));
}

std::vector<int64_t> loop_placement(int64_t lanes, int64_t stages) {
  std::vector<int64_t> lane_of_stage;
  for (int64_t s = 0; s < stages; ++s) {
    lane_of_stage.push_back(s % lanes);
  }
  return lane_of_stage;
}

std::vector<int64_t> v_placement(int64_t lanes) {
  std::vector<int64_t> lane_of_stage;
  for (int64_t s = 0; s < 2 * lanes; ++s) {
    lane_of_stage.push_back(s < lanes ? s : 2 * lanes - 1 - s);
  }
  return lane_of_stage;
}

/// Programs of every schedule on every placement build_program takes here:
/// one stage per lane, all on one lane, two per lane looped and in a V.
std::vector<gpipe::Program> every_built_program() {
  std::vector<std::vector<int64_t>> placements = {
      {0},
      {0, 1},
      {0, 1, 2, 3},
      {0, 0, 0},
      loop_placement(2, 4),
      loop_placement(3, 6),
      v_placement(2),
      v_placement(3)};
  std::vector<gpipe::Program> programs;
  for (const gpipe::Schedule schedule : gpipe::kEverySchedule) {
    size_t built = 0;
    for (const auto& placement : placements) {
      for (const int64_t m : {1, 3, 4, 8}) {
        try {
          programs.push_back(gpipe::build_program(
              schedule, static_cast<int64_t>(placement.size()), m, placement));
          ++built;
        } catch (const c10::Error&) {
          // A placement or size this schedule does not take.
        }
      }
    }
    EXPECT_GT(built, 0u) << schedule;
  }
  return programs;
}

} // namespace

TEST(ProgramCsv, FormatsAreNamed) {
  EXPECT_STREQ(gpipe::to_string(ProgramFormat::Text), "text");
  EXPECT_STREQ(gpipe::to_string(kComputeOnly), "pipelining_compute_only");
  EXPECT_STREQ(gpipe::to_string(kComputeComms), "pipelining_compute_comms");
}

TEST(ProgramCsv, TheTextFormatIsGpipesOwn) {
  const gpipe::Program program = gpipe::build_program(
      gpipe::Schedule::OneFOneB, 2, 3, std::vector<int64_t>{0, 1});
  EXPECT_EQ(
      gpipe::format_program(program, ProgramFormat::Text),
      gpipe::format_program(program));
  EXPECT_EQ(
      gpipe::parse_program(gpipe::format_program(program), ProgramFormat::Text),
      program);
}

TEST(ProgramCsv, AComputeOnlyFileFromPipeliningParsesToItsProgram) {
  // Idle cells skipped, communication added by gpipe's lower: LoopedBFS's
  // program.
  expect_reads_as(
      kLoopedBfsComputeOnly,
      kComputeOnly,
      {0, 1},
      "lane 0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B1 0B1 0RECV_B0 0B0\n"
      "lane 1: 1RECV_F0 1F0 1RECV_F1 1F1 1B1 1SEND_B1 1B0 1SEND_B0\n");
  EXPECT_EQ(
      gpipe::parse_program(kLoopedBfsComputeOnly, kComputeOnly),
      gpipe::build_program(
          gpipe::Schedule::LoopedBFS, 2, 2, std::vector<int64_t>{0, 1}));
}

TEST(ProgramCsv, AComputeCommsFileKeepsPipeliningsReceivesWhereItPutsThem) {
  // UNSHARD, RESHARD and REDUCE_GRAD dropped; every other action as
  // written, and valid so: a receive placed early waits early, and cannot
  // deadlock.
  expect_reads_as(
      kInterleavedComputeComms,
      kComputeComms,
      {0, 1, 0, 1},
      "lane 0: 0F0 0SEND_F0 2RECV_F0 0F1 0SEND_F1 2RECV_F1 2F0 2SEND_F0 2F1 2SEND_F1 2RECV_B0 2B0 2SEND_B0 2RECV_B1 2B1 2SEND_B1 0RECV_B0 0B0 0RECV_B1 0B1\n"
      "lane 1: 1RECV_F0 1F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1 3RECV_F0 3F0 3RECV_F1 3B0 3SEND_B0 1RECV_B0 3F1 3B1 3SEND_B1 1RECV_B1 1B0 1SEND_B0 1B1 1SEND_B1\n");
}

TEST(ProgramCsv, FsdpActionsOrderNothingAndAreDropped) {
  expect_reads_as(
      kGPipeOrder,
      kComputeOnly,
      {0, 1},
      "lane 0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1\n"
      "lane 1: 1RECV_F0 1F0 1RECV_F1 1F1 1B0 1SEND_B0 1B1 1SEND_B1\n");
}

TEST(ProgramCsv, AnOverlapCellRunsItsForwardThenItsBackwardOnItsLane) {
  // (0F3;3B1)OVERLAP_F_B is 0F3 then 3B1, with 0F3's send between them.
  expect_reads_as(
      kDualPipeVComputeOnly,
      kComputeOnly,
      {0, 1, 1, 0},
      "lane 0: 0F0 0SEND_F0 0F1 0SEND_F1 0F2 0SEND_F2 3RECV_F0 3F0 3I0 3SEND_B0 3W0 3RECV_F1 3F1 0F3 0SEND_F3 3B1 3SEND_B1 3RECV_F2 3F2 0RECV_B0 0B0 3B2 3SEND_B2 3RECV_F3 3F3 0RECV_B1 0B1 3B3 3SEND_B3 0RECV_B2 0I2 0W2 0RECV_B3 0I3 0W3\n"
      "lane 1: 1RECV_F0 1F0 2F0 2SEND_F0 1RECV_F1 1F1 2F1 2SEND_F1 1RECV_F2 1F2 2RECV_B0 2B0 2F2 2SEND_F2 1B0 1SEND_B0 1RECV_F3 1F3 2RECV_B1 2B1 2F3 2SEND_F3 1B1 1SEND_B1 2RECV_B2 2B2 1B2 1SEND_B2 2RECV_B3 2I3 1I3 1SEND_B3 2W3 1W3\n");
}

TEST(ProgramCsv, PipeliningsOneFOneBOrderWithoutItsLastRanksF0IsRejected) {
  const gpipe::Program program =
      gpipe::parse_program(kOneFOneBOrder, kComputeOnly);
  const std::string message =
      gpipe_test::error_of([&] { gpipe::simulate(program); });
  EXPECT_TRUE(starts_with(
      message,
      "gpipe: invalid program: lane 1: 1B0 comes before its forward 1F0"))
      << message;
}

TEST(ProgramCsv, CellsReadAsPythonsCsvModuleWritesThem) {
  // Quoted cells (Python quotes a cell with ',', '"' or a line end; a row
  // whose one cell is empty is written ""), spaces around a cell, a blank
  // line (a rank without actions), "\n" line ends and no last line end.
  const gpipe::Program program = gpipe::parse_program(
      "\"0F0\", 0F1 ,\"(0B1; 0B0)OVERLAP_F_B\"\n\"\"\r\n\n", kComputeOnly);
  EXPECT_EQ(
      gpipe::format_program(program),
      "lane 0: 0F0 0F1 0B1 0B0\nlane 1:\nlane 2:\n");
  EXPECT_EQ(
      gpipe::parse_program("0F0\r\n\r\n1F0", kComputeOnly).lane_of_stage,
      (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(gpipe::parse_program("", kComputeOnly), gpipe::Program{});
  // A quoted ',' is in its cell, which is then no action, named whole.
  const std::string message =
      error_of_parse("0F0,\"0F1,0F2\"\r\n", kComputeOnly);
  EXPECT_TRUE(contains(message, "column 2 (both 1-based)")) << message;
  EXPECT_TRUE(contains(message, "(cell: '0F1,0F2')")) << message;
}

TEST(ProgramCsv, AComputeOnlyFileIsWrittenAsPipeliningWritesOne) {
  const gpipe::Program program = gpipe::build_program(
      gpipe::Schedule::OneFOneB, 2, 2, std::vector<int64_t>{0, 1});
  EXPECT_EQ(
      gpipe::format_program(program, kComputeOnly),
      "0F0,0F1,0B0,0B1\r\n"
      "1F0,1B0,1F1,1B1\r\n");
}

TEST(
    ProgramCsv,
    AComputeCommsFileReducesEachStagesGradientsAfterItsLastBackward) {
  // REDUCE_GRAD after the last B's send, or after the last W, as
  // pipelining's lowering puts it: its runtime scales the gradients there.
  const gpipe::Program program = gpipe::build_program(
      gpipe::Schedule::OneFOneB, 2, 2, std::vector<int64_t>{0, 1});
  EXPECT_EQ(
      gpipe::format_program(program, kComputeComms),
      "0F0,0SEND_F0,0F1,0SEND_F1,0RECV_B0,0B0,0RECV_B1,0B1,0REDUCE_GRAD\r\n"
      "1RECV_F0,1F0,1B0,1SEND_B0,1RECV_F1,1F1,1B1,1SEND_B1,1REDUCE_GRAD\r\n");
  const gpipe::Program split = gpipe::build_program(
      gpipe::Schedule::ZeroBubbleH1, 1, 2, std::vector<int64_t>{0});
  EXPECT_EQ(
      gpipe::format_program(split, kComputeComms),
      "0F0,0I0,0W0,0F1,0I1,0W1,0REDUCE_GRAD\r\n");
  // A program without communication is lowered first.
  gpipe::Program bare = program;
  for (auto& lane : bare.lanes) {
    std::vector<gpipe::Action> compute;
    for (const auto& action : lane) {
      if (gpipe::is_compute(action.op)) {
        compute.push_back(action);
      }
    }
    lane = compute;
  }
  EXPECT_EQ(
      gpipe::format_program(bare, kComputeComms),
      gpipe::format_program(program, kComputeComms));
}

TEST(ProgramCsv, EveryScheduleRoundTripsThroughEveryFormat) {
  for (const gpipe::Program& program : every_built_program()) {
    for (const ProgramFormat format :
         {ProgramFormat::Text, kComputeOnly, kComputeComms}) {
      const std::string text = gpipe::format_program(program, format);
      EXPECT_EQ(gpipe::parse_program(text, format), program) << format << "\n"
                                                             << text;
    }
  }
}

TEST(ProgramCsv, EachMalformedCellIsAnErrorNamingItsRowAndColumn) {
  struct Case {
    const char* text;
    ProgramFormat format;
    const char* message;
  };
  const Case cases[] = {
      {"0F0,0Q1",
       kComputeOnly,
       "gpipe: cannot parse pipelining CSV at row 1 (rank 0), column 2 (both 1-based): unknown op 'Q' (pipelining's ops: F, B, I, W, SEND_F, RECV_F, SEND_B, RECV_B, UNSHARD, RESHARD, REDUCE_GRAD, OVERLAP_F_B) (cell: '0Q1')"},
      {"0F0\r\n1F0,x1",
       kComputeOnly,
       "gpipe: cannot parse pipelining CSV at row 2 (rank 1), column 2 (both 1-based): expected <stage><op><micro-batch> such as 2F0 or 0RECV_B3, <stage><op> for UNSHARD, RESHARD and REDUCE_GRAD, or (<action>;<action>)OVERLAP_F_B (cell: 'x1')"},
      {"0F0,,0F",
       kComputeOnly,
       "column 3 (both 1-based): F needs a micro-batch of 1 to 9 digits (cell: '0F')"},
      {"0F1234567890",
       kComputeOnly,
       "column 1 (both 1-based): F needs a micro-batch of 1 to 9 digits"},
      {"1234567890F0", kComputeOnly, "column 1 (both 1-based): expected"},
      {"0F0x", kComputeOnly, "column 1 (both 1-based): expected"},
      {"0UNSHARD3",
       kComputeComms,
       "column 1 (both 1-based): UNSHARD takes no micro-batch (cell: '0UNSHARD3')"},
      {"(0F0;0SEND_F0)OVERLAP_F_B",
       kComputeComms,
       "OVERLAP_F_B groups compute actions (F, B, I, W), not '0SEND_F0'"},
      {"(0F0;0UNSHARD)OVERLAP_F_B",
       kComputeComms,
       "OVERLAP_F_B groups compute actions (F, B, I, W), not '0UNSHARD'"},
      {"(0F0;1B0)OVERLAP",
       kComputeOnly,
       "a group of actions is written (<action>;<action>)OVERLAP_F_B"},
      {"(0F0;1B0", kComputeOnly, "a group of actions is written"},
      {"(;)OVERLAP_F_B", kComputeOnly, "OVERLAP_F_B groups no action"},
      {"0F0,\"0F1",
       kComputeOnly,
       "row 1 (rank 0), column 2 (both 1-based): its opening '\"' is never closed (cell: '0F1')"},
      {"\"0F0\"x,0F1",
       kComputeOnly,
       "column 1 (both 1-based): text follows its closing '\"'; expected ',' or the end of the line (cell: '0F0')"},
      {"0F0,1F0\r\n1B0",
       kComputeOnly,
       "row 2 (rank 1), column 1 (both 1-based): stage 1 is on row 1 too (column 2); a stage runs on one rank (cell: '1B0')"},
      {"0F0,0SEND_F0",
       kComputeOnly,
       "column 2 (both 1-based): a compute-only file has no communication; read it as ProgramFormat::PipeliningComputeComms (cell: '0SEND_F0')"},
      {"0F0,\x01\xff",
       kComputeOnly,
       "column 2 (both 1-based): expected <stage><op><micro-batch>"},
      {"0F0,2F0",
       kComputeOnly,
       "gpipe: cannot parse pipelining CSV: stage 1 has no action, but stage 2 has (stages are numbered from 0, each used)"},
      {"0F0,0F2",
       kComputeComms,
       "gpipe: cannot parse pipelining CSV: micro-batch 1 has no action, but micro-batch 2 has (micro-batches are numbered from 0, each used)"},
  };
  for (const Case& c : cases) {
    const std::string message = error_of_parse(c.text, c.format);
    EXPECT_TRUE(starts_with(message, "gpipe: ")) << message;
    EXPECT_TRUE(contains(message, c.message)) << message;
  }
  // Bytes that do not print are shown as \xNN.
  EXPECT_TRUE(contains(
      error_of_parse("0F0,\x01\xff", kComputeOnly), "(cell: '\\x01\\xff')"));
}

TEST(ProgramCsv, RandomBytesAndTruncationsThrowACleanErrorOrParse) {
  // Each input either parses (and then simulates or throws a c10::Error) or
  // throws a c10::Error; anything else fails the test (a crash ends it).
  std::vector<std::string> inputs;
  const std::string files[] = {
      kLoopedBfsComputeOnly,
      kInterleavedComputeComms,
      kGPipeOrder,
      kDualPipeVComputeOnly,
      "\"0F0\",\"a,b\",\"say \"\"x\"\"\"\r\n\"\"\r\n"};
  std::mt19937 random(23);
  for (const std::string& file : files) {
    for (size_t k = 0; k <= file.size(); ++k) {
      inputs.push_back(file.substr(0, k));
    }
    for (int k = 0; k < 100; ++k) {
      std::string mutated = file;
      mutated[random() % mutated.size()] = static_cast<char>(random() % 256);
      inputs.push_back(mutated);
    }
  }
  const std::string alphabet = "0123456789FBIW_SENDRECVUHAOLP(;),\"\r\n \t";
  for (int k = 0; k < 400; ++k) {
    std::string text(random() % 40, ' ');
    for (char& c : text) {
      c = k % 2 == 0 ? alphabet[random() % alphabet.size()]
                     : static_cast<char>(random() % 256);
    }
    inputs.push_back(text);
  }
  int parsed = 0;
  for (const std::string& input : inputs) {
    for (const ProgramFormat format : {kComputeOnly, kComputeComms}) {
      try {
        const gpipe::Program program = gpipe::parse_program(input, format);
        ++parsed;
        gpipe::simulate(program);
      } catch (const c10::Error& e) {
        EXPECT_TRUE(starts_with(e.what_without_backtrace(), "gpipe: "))
            << e.what_without_backtrace();
      } catch (...) {
        ADD_FAILURE() << "not a c10::Error, for "
                      << gpipe::detail::printable(input);
      }
    }
  }
  EXPECT_GT(parsed, 0);
}

} // namespace program_csv_test
