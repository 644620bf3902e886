# cmake -DBUILD_DIR=... -DPREFIX=... [-DCONFIG=...] -P install.cmake
# Installs the gpipe build in BUILD_DIR into a fresh PREFIX (no stale headers
# from an earlier run), then checks the files a consumer relies on.
file(REMOVE_RECURSE "${PREFIX}")
set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${config_args}
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (exit ${result})")
endif()
foreach(file
    include/gpipe/gpipe.h
    include/gpipe/version.h
    share/cmake/gpipe/gpipeConfig.cmake
    share/cmake/gpipe/gpipeConfigVersion.cmake
    share/cmake/gpipe/gpipeTargets.cmake)
  if(NOT EXISTS "${PREFIX}/${file}")
    message(FATAL_ERROR "installed prefix lacks ${file}")
  endif()
endforeach()
message(STATUS "gpipe installed into ${PREFIX}")
