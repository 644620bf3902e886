// Sanitizer runtime defaults for gpipe's sanitizer builds (GPIPE_SANITIZE),
// linked into every executable of such a build so that ctest, GoogleTest's
// test discovery and a test program run by hand all behave the same.
// ASAN_OPTIONS, UBSAN_OPTIONS, LSAN_OPTIONS and TSAN_OPTIONS in the
// environment are parsed after these and override them.
//
// LibTorch comes prebuilt and is not instrumented: ASan/UBSan see only our
// code, gtest and the inline LibTorch code compiled into our objects. Each
// option below says why it is there; none hides a report from gpipe's code.
// Measured so far (CPU): the two-TU pipe program runs clean under ASan+UBSan
// with LeakSanitizer on and no suppression, so LibTorch's static
// initialisation needs none. The full suite still has to be rerun on a
// consistent tree before anything is added here.

extern "C" {

// NOLINTBEGIN: the sanitizer runtimes look these names up.

const char* __asan_default_options() {
  return
      // CUDA's driver maps memory inside ASan's shadow gap; with the gap
      // protected, the first CUDA call fails (out of memory / initialization
      // error). Only matters on a machine with a GPU; costs nothing on CPU.
      // (Not exercised in CI, which has no GPU.)
      "protect_shadow_gap=0:"
      // Stop at the first error, with a readable summary.
      "halt_on_error=1:print_summary=1";
}

const char* __ubsan_default_options() {
  // A stack trace for every report; -fno-sanitize-recover already stops.
  return "print_stacktrace=1:halt_on_error=1";
}

const char* __tsan_default_options() {
  // The tsan preset (CMakePresets.json) runs the concurrency, executor and
  // skip suites, and .ci/run fails on any report. LibTorch is not
  // instrumented, so TSan sees only the LibTorch code inlined into ours.
  // Keep going after a report so one run lists them all.
  return "halt_on_error=0:second_deadlock_stack=1";
}

const char* __tsan_default_suppressions() {
  // One report, measured on the three suites (issue 21), each line with
  // its reason:
  // - torch::autograd::Node::topological_nr() sets the node's plain bool
  //   has_parent_ to true whenever a graph takes an edge to the node
  //   (LibTorch's inline code in function.h). Under forward() every cell is
  //   a node whose extra inputs are all of the pipe's parameters (Note [A
  //   cell is one autograd node]), so cells on concurrent CPU lanes take
  //   edges to the same AccumulateGrad nodes at once and write that bool
  //   together: the same value, but a race by the letter. Plain LibTorch
  //   does the same with a parameter shared by two threads. Giving each cell
  //   only the parameters its graph reaches would end gpipe's part of it
  //   (and cut forward()'s per-call cost): open, in the notes of issue 21.
  return "race:torch::autograd::Node::topological_nr\n";
}

// NOLINTEND

} // extern "C"
