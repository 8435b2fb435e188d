"""The consumer-group worker and the engine adapters it drives (vLLM, and a stand-in for queue tests)."""
