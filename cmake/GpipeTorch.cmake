# Finds LibTorch; a top-level gpipe build installs it first when it is missing.
#
# A LibTorch given by the user (CMAKE_PREFIX_PATH or Torch_DIR) always wins.
# Next comes gpipe's own cache (GPIPE_CACHE_DIR, else $XDG_CACHE_HOME/gpipe,
# else ~/.cache/gpipe), where the `torch` wheel pinned below lives once a
# top-level gpipe build has installed it with pip; every build directory, CI
# run and consumer project then reuses it. The wheel carries the complete
# LibTorch (headers, shared libraries and its CMake config) and is what our
# CUDA test machine runs. It is installed with `pip --target`, so Python's own
# `import torch` does not see it (PYTHONPATH=<cache>/torch-<version> does).
#
# Only a build that asks for it (GPIPE_DOWNLOAD_TORCH, ON for a top-level
# gpipe build) installs the 4.5 GB wheel: a project that add_subdirectory()s
# gpipe without LibTorch gets an error saying what to point CMake at.

# The one place the LibTorch version is pinned.
set(GPIPE_TORCH_VERSION "2.11.0" CACHE STRING "torch wheel version installed when LibTorch is not found")

# gpipe's cache folder, in `out`.
function(gpipe_torch_cache_dir out)
  if(DEFINED ENV{GPIPE_CACHE_DIR})
    set(cache "$ENV{GPIPE_CACHE_DIR}")
  elseif(DEFINED ENV{XDG_CACHE_HOME})
    set(cache "$ENV{XDG_CACHE_HOME}/gpipe")
  else()
    set(cache "$ENV{HOME}/.cache/gpipe")
  endif()
  set(${out} "${cache}" PARENT_SCOPE)
endfunction()

# gpipe_find_torch(<download>): finds LibTorch, from the user's paths, else
# from gpipe's cache; when neither has it, installs it into the cache if
# <download> is true and stops with instructions otherwise.
function(gpipe_find_torch download)
  find_package(Torch CONFIG QUIET)
  if(Torch_FOUND)
    message(STATUS "gpipe: using LibTorch from ${Torch_DIR}")
    return()
  endif()

  gpipe_torch_cache_dir(cache)
  set(target "${cache}/torch-${GPIPE_TORCH_VERSION}")
  set(config_dir "${target}/torch/share/cmake/Torch")

  if(NOT download AND NOT EXISTS "${config_dir}/TorchConfig.cmake")
    message(FATAL_ERROR
      "gpipe needs LibTorch and did not find it. Point CMake at the LibTorch you build with:\n"
      "  -DTorch_DIR=<libtorch>/share/cmake/Torch   (or add <libtorch> to CMAKE_PREFIX_PATH)\n"
      "For a pip-installed torch:\n"
      "  -DTorch_DIR=$(python3 -c 'import torch, os; print(os.path.join(torch.utils.cmake_prefix_path, \"Torch\"))')\n"
      "gpipe also looks in its own cache, ${config_dir} (not there). "
      "A top-level build of gpipe (cmake -S <gpipe> -B <build>) installs torch==${GPIPE_TORCH_VERSION} "
      "there once (about 4.5 GB); as a subproject gpipe does that only with -DGPIPE_DOWNLOAD_TORCH=ON.")
  endif()

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
