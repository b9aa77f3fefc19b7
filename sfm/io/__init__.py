"""Weight I/O: safetensors files, the sfm format, Kyutai's Mimi and Moshi LM layouts, and
`load_weights`, which tells them apart."""
