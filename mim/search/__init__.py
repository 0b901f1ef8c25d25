"""Search: exact top-k, the vector stores, ranking and fusion, and the embedder interface.

knn        the embedded exact inner-product index (`KnnIndex`: NumPy on the CPU, CuPy on the GPU)
stores     one vector-store interface, the registry that maps a location to its implementation, and
           `open_store`; stores.exact (a KnnIndex at its file) and stores.milvus (a Milvus collection)
ranking    exact top-k over small galleries, image-text fusion and refinement
embedding  the `Embedder` interface and its in-process implementations (torch, ONNX)

May import: `mim.model` (configs, preprocessing, tokenizers), the top-level helpers and itself; never
`mim.serving` (the ONNX embedder that runs the serving code in process is mim.serving.onnx_embedder).
"""
