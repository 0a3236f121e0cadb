"""After training: fold an adapter into its base (merge), quantize (gptq), chat, and check what will be served
(deploy, with the vLLM engine in vllm.py)."""
