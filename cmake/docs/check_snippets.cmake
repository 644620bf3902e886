# Docs.EveryCppBlockIsCompiled (cmake/GpipeDocs.cmake): every ```cpp block
# of README.md and docs/*.md, as the pages read now, is a snippet that
# gpipe_docs_snippets has compiled in (or one left out of this build, with
# its test skipped). Fails on a block whose marker stopped matching, a page
# added or edited since the last build, or a snippet that vanished.
#   cmake -D readme=README.md -D docs_dir=docs -D program=gpipe_docs_snippets
#         -D left_out="Page.Name;..." -P check_snippets.cmake
cmake_minimum_required(VERSION 3.18)
include("${CMAKE_CURRENT_LIST_DIR}/page_name.cmake")

file(GLOB pages "${docs_dir}/*.md")
list(PREPEND pages "${readme}")
set(expected "")
set(blocks 0)
set(marked 0)
foreach(page_path IN LISTS pages)
  gpipe_docs_page_name("${page_path}" page)
  file(READ "${page_path}" text)
  # One element per line; ';', '[', ']' and '\' would split or join them.
  string(REGEX REPLACE "[][;\\]" "_" text "${text}")
  string(REPLACE "\n" ";" lines "${text}")
  set(after_fence OFF)
  foreach(line IN LISTS lines)
    if(after_fence)
      if(line MATCHES "^ *// snippet: ([A-Za-z0-9]+)")
        list(APPEND expected "${page}.${CMAKE_MATCH_1}")
        math(EXPR marked "${marked} + 1")
      else()
        list(APPEND expected "${page}.<a block without a marker: ${line}>")
      endif()
      set(after_fence OFF)
    elseif(line MATCHES "^ *```cpp *$")
      math(EXPR blocks "${blocks} + 1")
      set(after_fence ON)
    endif()
  endforeach()
endforeach()

execute_process(COMMAND "${program}" --list
                OUTPUT_VARIABLE listed RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "${program} --list failed (${status})")
endif()
string(STRIP "${listed}" listed)
string(REPLACE "\n" ";" compiled "${listed}")
list(APPEND compiled ${left_out})

list(SORT expected)
list(SORT compiled)
list(LENGTH compiled compiled_count)
if(NOT expected STREQUAL compiled)
  set(missing ${expected})
  list(REMOVE_ITEM missing ${compiled})
  set(extra ${compiled})
  list(REMOVE_ITEM extra ${expected})
  message(FATAL_ERROR
    "the pages have ${blocks} ```cpp blocks, ${marked} with a marker, but "
    "${compiled_count} snippets were compiled in.\n"
    "  in the pages, not compiled: ${missing}\n"
    "  compiled, not in the pages: ${extra}\n"
    "(rebuild after editing a page; every ```cpp block starts with `// snippet: Name`)")
endif()
if(NOT blocks EQUAL compiled_count)
  message(FATAL_ERROR "${blocks} ```cpp blocks but ${compiled_count} snippets")
endif()
message(STATUS "${blocks} ```cpp blocks in ${readme} and ${docs_dir}/*.md, each compiled")
