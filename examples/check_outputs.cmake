# Checks what `giant_mlp --partitions 2 --microbatches 4` wrote into ${dir}:
cmake_policy(SET CMP0057 NEW) # if(... IN_LIST ...)
# the pictures exist and are SVG, the trace and the summary are JSON, and the
# trace has one slice per (partition, micro-batch, phase).
foreach(name pipeline_schedule_K2_M4.svg schedule_measured.svg schedule_side_by_side.svg trace.json results.json
             schedule_step_fill_drain.svg schedule_step_1f1b.svg trace_step_fill_drain.json trace_step_1f1b.json
             schedule_step_interleaved_1f1b.svg schedule_step_zero_bubble_h1.svg
             schedule_theory_fill_drain.svg schedule_theory_1f1b.svg
             schedule_theory_interleaved_1f1b.svg schedule_theory_zero_bubble_h1.svg
             schedule_step_looped_bfs.svg schedule_theory_looped_bfs.svg
             schedule_step_interleaved_zero_bubble.svg schedule_theory_interleaved_zero_bubble.svg
             schedule_step_zero_bubble_v.svg schedule_theory_zero_bubble_v.svg
             schedule_step_dual_pipe_v.svg schedule_theory_dual_pipe_v.svg)
  if(NOT EXISTS "${dir}/${name}")
    message(FATAL_ERROR "giant_mlp did not write ${dir}/${name}")
  endif()
endforeach()
foreach(name pipeline_schedule_K2_M4.svg schedule_measured.svg schedule_side_by_side.svg
             schedule_step_fill_drain.svg schedule_step_1f1b.svg
             schedule_step_interleaved_1f1b.svg schedule_step_zero_bubble_h1.svg
             schedule_theory_fill_drain.svg schedule_theory_zero_bubble_h1.svg)
  file(READ "${dir}/${name}" svg)
  if(NOT svg MATCHES "^<svg " OR NOT svg MATCHES "</svg>\n$")
    message(FATAL_ERROR "${dir}/${name} is not an SVG")
  endif()
endforeach()

if(CMAKE_VERSION VERSION_LESS 3.19)
  message(STATUS "giant_mlp outputs exist (CMake ${CMAKE_VERSION} cannot parse JSON; 3.19 can)")
  return()
endif()

file(READ "${dir}/trace.json" trace)
string(JSON count LENGTH "${trace}" traceEvents) # fails on malformed JSON
set(slices 0)
math(EXPR last "${count} - 1")
foreach(k RANGE ${last})
  string(JSON ph GET "${trace}" traceEvents ${k} ph)
  if(ph STREQUAL "X")
    string(JSON name GET "${trace}" traceEvents ${k} name)
    string(JSON partition GET "${trace}" traceEvents ${k} args partition)
    if("${partition}:${name}" IN_LIST seen)
      message(FATAL_ERROR "trace.json has two slices ${name} on partition ${partition}")
    endif()
    list(APPEND seen "${partition}:${name}")
    math(EXPR slices "${slices} + 1")
  endif()
endforeach()
# 2 partitions x 4 micro-batches: forward, backward, and recompute of all but
# the last micro-batch (except_last).
if(NOT slices EQUAL 22)
  message(FATAL_ERROR "trace.json has ${slices} slices, expected 22")
endif()

file(READ "${dir}/results.json" results)
string(JSON rows LENGTH "${results}")
if(rows LESS 4)
  message(FATAL_ERROR "results.json has ${rows} configurations, expected at least 4")
endif()
message(STATUS "giant_mlp outputs: 3 SVGs, ${slices} trace slices, ${rows} configurations")
