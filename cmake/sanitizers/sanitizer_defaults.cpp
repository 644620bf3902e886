// Sanitizer runtime defaults for gpipe's sanitizer builds (GPIPE_SANITIZE),
// linked into every executable of such a build so that ctest, GoogleTest's
// test discovery and a test program run by hand all behave the same.
// ASAN_OPTIONS, UBSAN_OPTIONS, LSAN_OPTIONS and TSAN_OPTIONS in the
// environment are parsed after these and override them.
//
// LibTorch comes prebuilt and is not instrumented. Each entry below says what
// that forces on us; nothing here hides a report from gpipe's own code.

extern "C" {

// NOLINTBEGIN: the sanitizer runtimes look these names up.

const char* __asan_default_options() {
  return
      // Fail fast and readably.
      "abort_on_error=0:halt_on_error=1:print_summary=1:"
      "symbolize=1";
}

const char* __ubsan_default_options() {
  return "print_stacktrace=1:halt_on_error=1";
}

const char* __lsan_default_suppressions() {
  return "";
}

const char* __tsan_default_options() {
  return "halt_on_error=0:second_deadlock_stack=1";
}

const char* __tsan_default_suppressions() {
  return "";
}

// NOLINTEND

} // extern "C"
