"""Engine connectors: thin, version-checked adapters between an engine and a BlockManager.

    core          engine-independent logic: shared manager per config, prefix match, load and
                  store plans, paged-KV gather/scatter (used by every adapter and tested alone)
    worker        WorkerSide: runs the plans against the engine's paged KV (re-exported by core)
    manager_backend / daemon_backend   the two backends both halves reach kvbm through: the
                  process's BlockManager, or a `kvbm serve` daemon (re-exported by core)
    vllm          KVBMConnector, a vLLM KVConnectorBase_V1 (scheduler and worker halves)
    vllm_pins     through a daemon, the scheduler half holds the pins of what its lookups
                  promise and releases each once (load reported done, request ended)
    vllm_hma      hybrid models through vLLM's hybrid memory allocator (sliding window, Mamba):
                  pages holding every KV cache group's piece (manifest.py, paged_hybrid.py)
    vllm_policy   KVBMCachePolicy: any kvbm EvictionPolicy as a vLLM offloading CachePolicy
    trtllm        TensorRT-LLM KvCacheConnectorScheduler / KvCacheConnectorWorker adapters
                  (their engine-independent halves in trtllm_core)

Only the engine modules import their engine; importing this package imports none.
"""
