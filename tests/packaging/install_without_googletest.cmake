# cmake -DSOURCE=<gpipe> -DBUILD_DIR=... -DPREFIX=... -DOPTIONS="a|b|..." -P install_without_googletest.cmake
# A machine with LibTorch and CMake only: configures gpipe as a top-level
# project in a fresh BUILD_DIR with OPTIONS (which hide GoogleTest), checks
# that the configure succeeds and skips the GoogleTest suite with a message,
# then installs into PREFIX (install.cmake's checks).
file(REMOVE_RECURSE "${BUILD_DIR}")
string(REPLACE "|" ";" options "${OPTIONS}")
execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE}" -B "${BUILD_DIR}" ${options}
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)
message("${output}")
if(NOT result EQUAL 0)
  message(FATAL_ERROR "configuring gpipe without GoogleTest failed (exit ${result})")
endif()
if(NOT output MATCHES "GoogleTest not found")
  message(FATAL_ERROR "the configure did not say that it skipped the GoogleTest suite")
endif()
file(GLOB_RECURSE test_files "${BUILD_DIR}/tests/CTestTestfile.cmake")
foreach(file IN LISTS test_files)
  file(READ "${file}" text)
  if(text MATCHES "gpipe_tests")
    message(FATAL_ERROR "the GoogleTest suite was configured although GoogleTest is hidden (${file})")
  endif()
endforeach()
include("${CMAKE_CURRENT_LIST_DIR}/install.cmake")
