# cmake -DSOURCE=... -DBUILD_DIR=... -DOPTIONS="a|b|..." -DEXPECT=<regex> -P expect_configure_error.cmake
# Configures SOURCE in a fresh BUILD_DIR with OPTIONS ("|" between them) and
# passes when the configure fails with output matching EXPECT: the error a
# user in that situation must see.
file(REMOVE_RECURSE "${BUILD_DIR}")
string(REPLACE "|" ";" options "${OPTIONS}")
execute_process(
  COMMAND "${CMAKE_COMMAND}" -S "${SOURCE}" -B "${BUILD_DIR}" ${options}
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)
message("${output}")
if(result EQUAL 0)
  message(FATAL_ERROR "the configure succeeded; expected it to fail with: ${EXPECT}")
endif()
# The message is wrapped over lines by CMake: match it as one line.
string(REGEX REPLACE "[ \t\r\n]+" " " flat "${output}")
if(NOT flat MATCHES "${EXPECT}")
  message(FATAL_ERROR "the configure failed, but without the expected message: ${EXPECT}")
endif()
message(STATUS "the configure failed as expected")
