// Host build of csrc/cuda/class_scores.cu through the CUDA emulation (same source, unchanged).
#include "cuda/class_scores.cu"
