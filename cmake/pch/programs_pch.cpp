// Compiles the precompiled <torch/torch.h> that gpipe's examples and
// benchmarks share (see the top-level CMakeLists.txt).
