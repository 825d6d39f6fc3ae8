"""The Triton backend: CUDA tensors, or CPU tensors through the interpreter (TRITON_INTERPRET=1).

One module per op family (`entropy`, `response`, `relu`), each imported only when chosen (see
`frmap.kernels._dispatch`). Inputs arrive validated and contiguous; outputs stay on the inputs'
device.
"""
