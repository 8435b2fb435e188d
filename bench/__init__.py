"""The benchmark harness behind `inferq bench`: the same workload through inferq and through vLLM (called
directly, its OpenAI server, `vllm run-batch`), timed alike. Not part of the product: nothing in
inferq.producer, inferq.worker or inferq.shared imports it. Its own dependencies come with the `bench` extra
(`pip install 'inferq[bench]'`); the runnable scripts and the recorded results are under benchmarks/.
"""
