# Included by llama.cpp's project() (CMAKE_PROJECT_llama.cpp_INCLUDE, from .ci/llama-cpp-args): leave out
# llama.cpp's "common" library, which llama-cpp-python switches on but neither loads nor ships in its
# package; it is 52 of the 140 compile steps.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)
