# Hygiene tooling for gpipe's own builds: warning flags, sanitizers, the
# header check and clang-tidy. Included only when gpipe is the top-level
# project, so a parent project's flags are never touched.
#
#   GPIPE_WARNINGS_AS_ERRORS        -Werror on the targets that get our warnings
#   GPIPE_HEADER_CHECK              build `header_check`: per C++ standard in
#                                   GPIPE_HEADER_CHECK_STANDARDS, one TU with
#                                   every header and the templates instantiated,
#                                   under -Wall -Wextra -Wpedantic; plus one TU
#                                   per public header on its own
#                                   (GPIPE_HEADER_CHECK_STANDALONE)
#   GPIPE_CLANG_TIDY                run clang-tidy (.clang-tidy) on the first
#                                   header-check TU
#   GPIPE_SANITIZE                  e.g. "address,undefined" or "thread": every
#                                   target of this build is instrumented
#
# LibTorch's headers come from an IMPORTED target, so CMake passes them with
# -isystem: its own warnings stay silent and only our headers are judged.

option(GPIPE_WARNINGS_AS_ERRORS "Turn warnings into errors on gpipe's checked targets" OFF)
option(GPIPE_HEADER_CHECK "Build the header_check target (headers compiled warning-clean)" OFF)
set(GPIPE_HEADER_CHECK_STANDARDS "17;20" CACHE STRING "C++ standards the header check compiles with")
option(GPIPE_HEADER_CHECK_STANDALONE "Header check: also compile each public header on its own" ON)
option(GPIPE_CLANG_TIDY "Run clang-tidy on the header check" OFF)
set(GPIPE_SANITIZE "" CACHE STRING "Sanitizers for the whole build (-fsanitize=...), e.g. address,undefined")

function(gpipe_target_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
  if(GPIPE_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()

# --- sanitizers --------------------------------------------------------------
if(GPIPE_SANITIZE)
  # -fno-sanitize-recover: a UBSan report fails the test instead of scrolling
  # by. Optimization and debug info come from the build type (the presets use
  # RelWithDebInfo with -O1 -g1).
  add_compile_options(-fsanitize=${GPIPE_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${GPIPE_SANITIZE})
  # Prebuilt LibTorch is not instrumented: the runtime options and
  # suppressions that this requires are compiled into every executable of the
  # build, each with its reason (cmake/sanitizers/sanitizer_defaults.cpp).
  # ASAN_OPTIONS & co. in the environment still override them.
  add_library(gpipe_sanitizer_defaults OBJECT "${PROJECT_SOURCE_DIR}/cmake/sanitizers/sanitizer_defaults.cpp")
  message(STATUS "gpipe: sanitizers ${GPIPE_SANITIZE}")
endif()

# Links the sanitizer defaults into every executable created in `dir` (called
# by the top-level CMakeLists.txt after the tests, examples and benchmarks).
function(gpipe_add_sanitizer_defaults dir)
  if(NOT TARGET gpipe_sanitizer_defaults)
    return()
  endif()
  get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
  foreach(target IN LISTS targets)
    get_target_property(type ${target} TYPE)
    if(type STREQUAL "EXECUTABLE")
      target_link_libraries(${target} PRIVATE gpipe_sanitizer_defaults)
    endif()
  endforeach()
  get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
  foreach(subdir IN LISTS subdirs)
    gpipe_add_sanitizer_defaults("${subdir}")
  endforeach()
endfunction()

# --- header check ------------------------------------------------------------
if(GPIPE_HEADER_CHECK)
  file(GLOB gpipe_public_headers CONFIGURE_DEPENDS
       RELATIVE "${PROJECT_SOURCE_DIR}/include" "${PROJECT_SOURCE_DIR}/include/gpipe/*.h")
  # detail/ has rooms of its own (cell/, program/).
  file(GLOB_RECURSE gpipe_detail_headers CONFIGURE_DEPENDS
       RELATIVE "${PROJECT_SOURCE_DIR}/include" "${PROJECT_SOURCE_DIR}/include/gpipe/detail/*.h")
  set(includes "")
  foreach(header IN LISTS gpipe_public_headers gpipe_detail_headers)
    string(APPEND includes "#include <${header}>\n")
  endforeach()
  set(all_cpp "${CMAKE_CURRENT_BINARY_DIR}/header_check/all_headers.cpp")
  configure_file("${PROJECT_SOURCE_DIR}/cmake/header_check/all_headers.cpp.in" "${all_cpp}" @ONLY)

  add_custom_target(header_check)
  set(first ON)
  foreach(std IN LISTS GPIPE_HEADER_CHECK_STANDARDS)
    set(target gpipe_header_check_cxx${std})
    set(sources "${all_cpp}")
    if(first AND GPIPE_HEADER_CHECK_STANDALONE)
      # Each public header compiled first and alone (twice, for the include
      # guard): it must include what it uses. One standard is enough.
      foreach(header IN LISTS gpipe_public_headers)
        get_filename_component(name "${header}" NAME_WE)
        set(cpp "${CMAKE_CURRENT_BINARY_DIR}/header_check/standalone_${name}.cpp")
        file(CONFIGURE OUTPUT "${cpp}" CONTENT
             "// Generated: <${header}> on its own.\n#include <${header}>\n#include <${header}>\n")
        list(APPEND sources "${cpp}")
      endforeach()
    endif()
    add_library(${target} OBJECT ${sources})
    target_link_libraries(${target} PRIVATE gpipe::gpipe)
    # -std=c++NN, not gnu++NN: -Wpedantic judges standard C++.
    set_target_properties(${target} PROPERTIES
      CXX_STANDARD ${std} CXX_STANDARD_REQUIRED ON CXX_EXTENSIONS OFF)
    gpipe_target_warnings(${target})
    if(first AND GPIPE_CLANG_TIDY)
      find_program(GPIPE_CLANG_TIDY_EXE NAMES clang-tidy clang-tidy-14 REQUIRED)
      # Checks and the header filter (our headers only) are in /.clang-tidy.
      set_target_properties(${target} PROPERTIES CXX_CLANG_TIDY "${GPIPE_CLANG_TIDY_EXE};--quiet")
    endif()
    add_dependencies(header_check ${target})
    set(first OFF)
  endforeach()
  # gpipe::distributed's headers, in one TU of their own (c10d's headers are
  # slow to parse): with the first standard only, where Gloo's headers are.
  if(GPIPE_GLOO_INCLUDE_DIR)
    list(GET GPIPE_HEADER_CHECK_STANDARDS 0 std)
    file(GLOB gpipe_distributed_headers CONFIGURE_DEPENDS
         RELATIVE "${PROJECT_SOURCE_DIR}/include" "${PROJECT_SOURCE_DIR}/include/gpipe/distributed/*.h")
    set(includes "#include <gpipe/distributed.h>\n#include <gpipe/distributed.h>\n")
    foreach(header IN LISTS gpipe_distributed_headers)
      string(APPEND includes "#include <${header}>\n")
    endforeach()
    set(cpp "${CMAKE_CURRENT_BINARY_DIR}/header_check/distributed_headers.cpp")
    file(CONFIGURE OUTPUT "${cpp}" CONTENT
         "// Generated: gpipe::distributed's headers.\n${includes}")
    add_library(gpipe_header_check_distributed OBJECT "${cpp}")
    target_link_libraries(gpipe_header_check_distributed PRIVATE gpipe::distributed)
    set_target_properties(gpipe_header_check_distributed PROPERTIES
      CXX_STANDARD ${std} CXX_STANDARD_REQUIRED ON CXX_EXTENSIONS OFF)
    gpipe_target_warnings(gpipe_header_check_distributed)
    add_dependencies(header_check gpipe_header_check_distributed)
    # The same as a build without NCCL sees them (LibTorch without
    # USE_C10D_NCCL, or no nccl.h): their other branches compile
    # warning-clean too (an unused variable there once escaped -Werror).
    add_library(gpipe_header_check_distributed_without_nccl OBJECT "${cpp}")
    target_link_libraries(gpipe_header_check_distributed_without_nccl PRIVATE gpipe::distributed)
    set_target_properties(gpipe_header_check_distributed_without_nccl PROPERTIES
      CXX_STANDARD ${std} CXX_STANDARD_REQUIRED ON CXX_EXTENSIONS OFF)
    target_compile_options(gpipe_header_check_distributed_without_nccl PRIVATE -UUSE_C10D_NCCL)
    gpipe_target_warnings(gpipe_header_check_distributed_without_nccl)
    add_dependencies(header_check gpipe_header_check_distributed_without_nccl)
  endif()
endif()
