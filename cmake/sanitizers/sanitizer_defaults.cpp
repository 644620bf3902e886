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
  // ThreadSanitizer is advisory here (the tsan preset in CMakePresets.json,
  // "Development" in docs/getting-started.md): LibTorch is not instrumented,
  // so TSan cannot see its synchronization. Keep going after a report so one
  // run lists them all.
  return "halt_on_error=0:second_deadlock_stack=1";
}

// NOLINTEND

} // extern "C"
