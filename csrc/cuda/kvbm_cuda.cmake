# Adds the CUDA kernels to _native when a toolkit is available (see KVBM_CUDA).
# They build as a separate static library: nanobind's compile flags are not all
# valid nvcc flags, and the glue in module.cpp stays plain C++.
set(KVBM_WITH_CUDA OFF)
if(NOT KVBM_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(KVBM_WITH_CUDA ON)
  elseif(KVBM_CUDA STREQUAL "ON")
    message(FATAL_ERROR "KVBM_CUDA=ON but no CUDA compiler was found (set CUDACXX or PATH)")
  endif()
endif()

if(KVBM_WITH_CUDA)
  # Ampere and Hopper SASS, plus sm_90 PTX that newer GPUs JIT; override with
  # -DCMAKE_CUDA_ARCHITECTURES=... ("native" needs a GPU at build time).
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 80-real 90)
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)

  file(GLOB KVBM_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/*.cu)
  add_library(kvbm_cuda STATIC ${KVBM_CUDA_SOURCES})
  set_target_properties(kvbm_cuda PROPERTIES
    POSITION_INDEPENDENT_CODE ON CUDA_STANDARD 17 CUDA_VISIBILITY_PRESET hidden)
  target_compile_options(kvbm_cuda PRIVATE -O3)
  # Static cudart: the module then imports on hosts without libcudart, and the
  # runtime reports "no driver" instead of failing at load time.
  target_link_libraries(kvbm_cuda PRIVATE CUDA::cudart_static)
  target_sources(_native PRIVATE ${CMAKE_CURRENT_LIST_DIR}/bindings.cpp)
  target_link_libraries(_native PRIVATE kvbm_cuda CUDA::cudart_static)
  target_compile_definitions(_native PRIVATE KVBM_WITH_CUDA=1)
  message(STATUS "kvbm: CUDA kernels ON (${CMAKE_CUDA_COMPILER_VERSION}, archs ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "kvbm: CUDA kernels OFF (KVBM_CUDA=${KVBM_CUDA})")
endif()
