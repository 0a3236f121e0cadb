"""Data: files -> validated conversations -> token ids and labels, cached.

sources (what --data_path names) -> reader (bounded chunks of records) -> records + tools (one record -> a
Conversation, every problem located) -> load (chunks validated, problems tallied) -> template (rendered with the
model's chat template, trained character spans) -> encode (token-exact ids and labels) -> prepare (the streaming
pipeline into the cache, with its report); split holds conversations out for evaluation.
"""
