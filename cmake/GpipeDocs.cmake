# gpipe's documentation, checked: the code in the guide is compiled and run,
# the Notes index is compared with the headers, and the API reference is
# generated from the headers' doc comments with warnings as errors.
#
# Snippets. Every ```cpp block of README.md and docs/*.md starts with a
# marker line, `// snippet: Name` (Name in CamelCase, unique on its page).
# This file extracts the blocks when CMake configures (it configures again
# when a page changes) and compiles the blocks of one page as one translation
# unit of the program gpipe_docs_snippets, each block in a namespace of its
# own and under #line directives, so a block that does not compile fails the
# build with the error at its line of the markdown. A block's #include lines
# go to the top of its page's unit: the blocks of a page see the headers the
# page has included so far, as its reader does. (Pages compile four to a
# unity unit, below, so a page that forgets an include that an earlier page
# of its unit made still compiles; each page's first program lists its
# includes.) A block that defines `int main()` is a program, and ctest runs
# it as Docs.<Page>.<Name> (README.md is the page Readme,
# docs/getting-started.md GettingStarted); it may return 77 to say it was
# skipped (no GPU). A program whose marker reads
# `// snippet: Name (torchrun, N ranks)` runs under torchrun as N processes.
# The other blocks are compiled only. Docs.EveryCppBlockIsCompiled counts the
# ```cpp blocks of the pages when it runs and compares them with the blocks
# compiled in, so a marker that stops matching cannot drop a block silently.
#
# Included from the top-level CMakeLists.txt, after the examples (it reuses
# their precompiled <torch/torch.h>).

set(gpipe_docs_dir "${PROJECT_SOURCE_DIR}/docs")
set(gpipe_docs_binary_dir "${PROJECT_BINARY_DIR}/docs")

include("${PROJECT_SOURCE_DIR}/cmake/docs/page_name.cmake")

# Extracts the ```cpp blocks of one page into <binary>/docs/snippets/<Page>.cpp.
# Sets, in the caller: <prefix>_snippets (Page.Name each), <prefix>_programs
# (the programs among them), <prefix>_torchrun_<Name> (ranks, for programs
# run under torchrun), <prefix>_needs_distributed (the page includes
# <gpipe/distributed.h>).
function(gpipe_docs_extract page_path page prefix)
  file(READ "${page_path}" text)
  # One list element per line. ';', '[', ']' and '\' mean something to CMake's
  # lists: stand-ins carry them through and are put back when writing.
  string(REPLACE "\\" "GPIPE_DOCS_BACKSLASH" text "${text}")
  string(REPLACE ";" "GPIPE_DOCS_SEMICOLON" text "${text}")
  string(REPLACE "[" "GPIPE_DOCS_LBRACKET" text "${text}")
  string(REPLACE "]" "GPIPE_DOCS_RBRACKET" text "${text}")
  string(REPLACE "\n" ";" lines "${text}")

  set(snippets "")
  set(programs "")
  set(needs_distributed OFF)
  set(includes "")
  set(bodies "")
  set(registrations "")
  set(state outside)
  set(number 0)
  foreach(line IN LISTS lines)
    math(EXPR number "${number} + 1")
    if(state STREQUAL "outside")
      if(line MATCHES "^ *```cpp *$")
        set(state marker)
        set(fence_line ${number})
      elseif(line MATCHES "^ *```")
        set(state other)
      endif()
    elseif(state STREQUAL "other")
      if(line MATCHES "^ *``` *$")
        set(state outside)
      endif()
    elseif(state STREQUAL "marker")
      if(NOT line MATCHES "^ *// snippet: ([A-Z][A-Za-z0-9]*)")
        message(FATAL_ERROR "${page_path}:${number}: a ```cpp block must start with "
                            "`// snippet: Name` (Name in CamelCase), so that a test compiles it; "
                            "use ```text for code that is not C++")
      endif()
      set(name "${CMAKE_MATCH_1}")
      set(rest "${line}")
      string(REGEX REPLACE "^ *// snippet: [A-Za-z0-9]*" "" rest "${rest}")
      set(ranks "")
      if(rest MATCHES "^ \\(torchrun, ([0-9]+) ranks\\)$")
        set(ranks "${CMAKE_MATCH_1}")
      elseif(NOT rest STREQUAL "")
        message(FATAL_ERROR "${page_path}:${number}: a snippet marker is `// snippet: Name` or "
                            "`// snippet: Name (torchrun, N ranks)`, not `${line}`")
      endif()
      if("${page}.${name}" IN_LIST snippets)
        message(FATAL_ERROR "${page_path}:${number}: a second snippet named ${name} on this page")
      endif()
      list(APPEND snippets "${page}.${name}")
      set(is_program OFF)
      string(APPEND bodies "namespace gpipe_docs_${page}_${name} {\n#line ${number} \"${page_path}\"\n${line}\n")
      set(state inside)
    elseif(state STREQUAL "inside")
      if(line MATCHES "^ *``` *$")
        string(APPEND bodies "}  // namespace gpipe_docs_${page}_${name}\n\n")
        if(is_program)
          list(APPEND programs "${page}.${name}")
          string(APPEND registrations
            "GPIPE_DOCS_REGISTER(\"${page}.${name}\", &gpipe_docs_${page}_${name}::main)\n")
          if(ranks)
            set(${prefix}_torchrun_${name} "${ranks}" PARENT_SCOPE)
          endif()
        else()
          if(ranks)
            message(FATAL_ERROR "${page_path}:${fence_line}: only a program (`int main()`) runs under torchrun")
          endif()
          string(APPEND registrations "GPIPE_DOCS_REGISTER(\"${page}.${name}\", nullptr)\n")
        endif()
        set(state outside)
      elseif(line MATCHES "^ *#include")
        # Hoisted to the top of the unit; an empty line keeps the numbering.
        string(APPEND includes "#line ${number} \"${page_path}\"\n${line}\n")
        string(APPEND bodies "\n")
        if(line MATCHES "gpipe/distributed\\.h")
          set(needs_distributed ON)
        endif()
      else()
        if(line MATCHES "^int main\\(")
          set(is_program ON)
        endif()
        string(APPEND bodies "${line}\n")
      endif()
    endif()
  endforeach()
  if(NOT state STREQUAL "outside")
    message(FATAL_ERROR "${page_path}: a code block opened at line ${fence_line} is never closed")
  endif()

  set(${prefix}_snippets "${snippets}" PARENT_SCOPE)
  set(${prefix}_programs "${programs}" PARENT_SCOPE)
  set(${prefix}_needs_distributed "${needs_distributed}" PARENT_SCOPE)
  if(NOT snippets)
    return()
  endif()
  string(CONCAT source "// Generated by cmake/GpipeDocs.cmake from ${page_path}:\n"
                       "// edit the page, not this file.\n"
                       "#include \"snippets.h\"\n\n${includes}\n${bodies}${registrations}")
  string(REPLACE "GPIPE_DOCS_BACKSLASH" "\\" source "${source}")
  string(REPLACE "GPIPE_DOCS_SEMICOLON" ";" source "${source}")
  string(REPLACE "GPIPE_DOCS_LBRACKET" "[" source "${source}")
  string(REPLACE "GPIPE_DOCS_RBRACKET" "]" source "${source}")
  # Written only when it changed, so a configure does not rebuild it.
  file(WRITE "${gpipe_docs_binary_dir}/snippets/${page}.cpp.new" "${source}")
  configure_file("${gpipe_docs_binary_dir}/snippets/${page}.cpp.new"
                 "${gpipe_docs_binary_dir}/snippets/${page}.cpp" COPYONLY)
  file(REMOVE "${gpipe_docs_binary_dir}/snippets/${page}.cpp.new")
endfunction()

# The documentation's tests come with the other tests. A build that picks
# test suites (GPIPE_TEST_SUITES, as the tsan preset does) leaves them out
# unless GPIPE_TEST_DOCS=ON asks for them; the asan-ubsan preset, which
# builds every suite, turns them off (they run the paths the suites test).
if(GPIPE_TEST_SUITES)
  set(gpipe_docs_tests_default OFF)
else()
  set(gpipe_docs_tests_default ON)
endif()
option(GPIPE_TEST_DOCS
  "Compile the code of README.md and docs/*.md and run its programs, with the tests"
  ${gpipe_docs_tests_default})
if(GPIPE_BUILD_TESTS AND GPIPE_TEST_DOCS)
  set(gpipe_docs_tests_wanted ON)
else()
  set(gpipe_docs_tests_wanted OFF)
endif()
if(gpipe_docs_tests_wanted)
  file(GLOB gpipe_docs_pages CONFIGURE_DEPENDS "${gpipe_docs_dir}/*.md")
  list(PREPEND gpipe_docs_pages "${PROJECT_SOURCE_DIR}/README.md")
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${gpipe_docs_pages})

  set(gpipe_docs_sources "${PROJECT_SOURCE_DIR}/cmake/docs/snippets_main.cpp")
  set(gpipe_docs_all_snippets "")
  set(gpipe_docs_left_out "")
  set(gpipe_docs_needs_distributed OFF)
  set(gpipe_docs_tests "")
  foreach(page_path IN LISTS gpipe_docs_pages)
    gpipe_docs_page_name("${page_path}" page)
    gpipe_docs_extract("${page_path}" "${page}" page)
    list(APPEND gpipe_docs_all_snippets ${page_snippets})
    if(NOT page_snippets)
      continue()
    endif()
    set(page_left_out OFF)
    if(page_needs_distributed)
      if(GPIPE_GLOO_INCLUDE_DIR)
        set(gpipe_docs_needs_distributed ON)
      else()
        set(page_left_out ON)
        list(APPEND gpipe_docs_left_out ${page_snippets})
      endif()
    endif()
    if(NOT page_left_out)
      list(APPEND gpipe_docs_sources "${gpipe_docs_binary_dir}/snippets/${page}.cpp")
    endif()
    foreach(program IN LISTS page_programs)
      set(test "Docs.${program}")
      string(REGEX REPLACE "^[^.]*\\." "" name "${program}")
      if(page_left_out)
        add_test(NAME ${test} COMMAND gpipe_docs_snippets --skip
                 "${program} needs gpipe::distributed, which needs Gloo's headers (libgloo-dev)")
      elseif(page_torchrun_${name})
        # Under torchrun, with the torch package of the wheel the build
        # installed; skipped (77) where Python cannot import it.
        get_filename_component(gpipe_docs_torch_python_path "${Torch_DIR}/../../../.." ABSOLUTE)
        add_test(NAME ${test}
          COMMAND bash -c "PYTHONPATH=\"$0\" python3 -c 'import torch.distributed.run' 2>/dev/null || { echo 'SKIP: python3 cannot import torch from '\"$0\"; exit 77; }; PYTHONPATH=\"$0\" OMP_NUM_THREADS=1 exec python3 -m torch.distributed.run --standalone --nproc-per-node ${page_torchrun_${name}} --no-python \"$1\" ${program}"
                  "${gpipe_docs_torch_python_path}" "$<TARGET_FILE:gpipe_docs_snippets>")
      else()
        add_test(NAME ${test} COMMAND gpipe_docs_snippets ${program})
      endif()
      list(APPEND gpipe_docs_tests ${test})
    endforeach()
  endforeach()

  add_executable(gpipe_docs_snippets ${gpipe_docs_sources})
  target_include_directories(gpipe_docs_snippets PRIVATE "${PROJECT_SOURCE_DIR}/cmake/docs")
  target_link_libraries(gpipe_docs_snippets PRIVATE gpipe::gpipe)
  if(gpipe_docs_needs_distributed)
    target_link_libraries(gpipe_docs_snippets PRIVATE gpipe::distributed)
  endif()
  # Glue around LibTorch's kernels, as the tests are: -O1 compiles faster.
  # The pages compile four to a unit: each unit instantiates the pipe once,
  # which is most of a page's compile time (the blocks' namespaces and
  # #line directives keep them apart).
  target_compile_options(gpipe_docs_snippets PRIVATE $<$<CONFIG:Release>:-O1>)
  set_target_properties(gpipe_docs_snippets PROPERTIES UNITY_BUILD ON UNITY_BUILD_BATCH_SIZE 4)
  if(TARGET gpipe_programs_pch)
    target_precompile_headers(gpipe_docs_snippets REUSE_FROM gpipe_programs_pch)
  else()
    target_precompile_headers(gpipe_docs_snippets PRIVATE <torch/torch.h>)
  endif()
  if(gpipe_docs_tests)
    set_tests_properties(${gpipe_docs_tests} PROPERTIES TIMEOUT 300 SKIP_RETURN_CODE 77)
  endif()

  add_test(NAME Docs.EveryCppBlockIsCompiled
    COMMAND "${CMAKE_COMMAND}"
            -D "docs_dir=${gpipe_docs_dir}"
            -D "readme=${PROJECT_SOURCE_DIR}/README.md"
            -D "program=$<TARGET_FILE:gpipe_docs_snippets>"
            -D "left_out=${gpipe_docs_left_out}"
            -P "${PROJECT_SOURCE_DIR}/cmake/docs/check_snippets.cmake")
  add_test(NAME Docs.DesignNotesIndexMatchesTheHeaders
    COMMAND "${CMAKE_COMMAND}" -D "root=${PROJECT_SOURCE_DIR}" -D mode=check
            -P "${PROJECT_SOURCE_DIR}/cmake/docs/notes_index.cmake")
endif()

# The API reference: `cmake --build build --target docs` writes
# build/docs/reference/html/index.html (the guide's pages and the headers'
# doc comments). Doxygen fails on any warning (docs/Doxyfile.in), so an
# undocumented public name fails the target; CI builds it as a stage of its
# own, so that the tests need no doxygen.
find_package(Doxygen QUIET)
if(DOXYGEN_FOUND)
  set(gpipe_docs_output "${gpipe_docs_binary_dir}/reference")
  configure_file("${gpipe_docs_dir}/Doxyfile.in" "${gpipe_docs_binary_dir}/Doxyfile" @ONLY)
  add_custom_target(docs
    COMMAND "${CMAKE_COMMAND}" -E make_directory "${gpipe_docs_output}"
    COMMAND Doxygen::doxygen "${gpipe_docs_binary_dir}/Doxyfile"
    COMMAND "${CMAKE_COMMAND}" -E echo "gpipe: API reference in ${gpipe_docs_output}/html/index.html"
    WORKING_DIRECTORY "${PROJECT_SOURCE_DIR}"
    COMMENT "Generating the API reference with Doxygen (warnings are errors)"
    VERBATIM)
else()
  message(STATUS "gpipe: doxygen not found: no `docs` target (the API reference); "
                 "install doxygen (Debian: doxygen)")
endif()
