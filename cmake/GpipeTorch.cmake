# Finds LibTorch, installing it first when it is missing.
#
# A LibTorch given by the user (CMAKE_PREFIX_PATH or Torch_DIR) always wins.
# Otherwise the `torch` wheel from PyPI, pinned below, is installed once with
# pip into a cache outside the source tree (GPIPE_CACHE_DIR, else
# $XDG_CACHE_HOME/gpipe, else ~/.cache/gpipe), which every build directory and
# CI run then reuses. The wheel carries the complete LibTorch (headers, shared
# libraries and its CMake config) and is what our CUDA test machine runs.

# The one place the LibTorch version is pinned.
set(GPIPE_TORCH_VERSION "2.11.0" CACHE STRING "torch wheel version installed when LibTorch is not found")

function(gpipe_find_torch)
  find_package(Torch CONFIG QUIET)
  if(Torch_FOUND)
    message(STATUS "gpipe: using LibTorch from ${Torch_DIR}")
    return()
  endif()

  if(DEFINED ENV{GPIPE_CACHE_DIR})
    set(cache "$ENV{GPIPE_CACHE_DIR}")
  elseif(DEFINED ENV{XDG_CACHE_HOME})
    set(cache "$ENV{XDG_CACHE_HOME}/gpipe")
  else()
    set(cache "$ENV{HOME}/.cache/gpipe")
  endif()
  set(target "${cache}/torch-${GPIPE_TORCH_VERSION}")
  set(config_dir "${target}/torch/share/cmake/Torch")

  file(MAKE_DIRECTORY "${cache}")
  # Two configures at once (ctest's packaging tests, parallel CI jobs) must not
  # both install into the same folder.
  file(LOCK "${cache}/torch-${GPIPE_TORCH_VERSION}.lock" GUARD FUNCTION TIMEOUT 1800)
  if(NOT EXISTS "${config_dir}/TorchConfig.cmake")
    find_package(Python3 COMPONENTS Interpreter REQUIRED)
    message(STATUS "gpipe: installing torch==${GPIPE_TORCH_VERSION} from PyPI into ${target} (once; about 4.5 GB)")
    file(REMOVE_RECURSE "${target}.partial")
    execute_process(
      COMMAND "${Python3_EXECUTABLE}" -m pip install --no-compile --disable-pip-version-check
              --target "${target}.partial" "torch==${GPIPE_TORCH_VERSION}"
      RESULT_VARIABLE pip_result)
    if(NOT pip_result EQUAL 0)
      message(FATAL_ERROR
        "gpipe: pip could not install torch==${GPIPE_TORCH_VERSION} (exit ${pip_result}). "
        "Install python3-pip, or point CMAKE_PREFIX_PATH at a LibTorch 2.x.")
    endif()
    file(RENAME "${target}.partial" "${target}")
  endif()
  find_package(Torch CONFIG REQUIRED PATHS "${config_dir}" NO_DEFAULT_PATH)
  message(STATUS "gpipe: using LibTorch ${GPIPE_TORCH_VERSION} from ${target}")
  # Torch_DIR is cached by find_package; later find_package(Torch) calls in
  # this project (and subprojects given -DTorch_DIR) reuse it.
endfunction()
