"""The training recipe: the loop in named phases, the architecture hooks, flags, optimizers, saving and state, CUDA graphs."""
