"""node/infer/gpu/kernels.cu compiled with g++ and run serially on the CPU, to test the kernels without a GPU."""
