"""KV-cache managers (which blocks each request owns) and the KV cache tensors themselves."""
from fastgen.kv.allocator import BlockAllocator
from fastgen.kv.cache import KVCache
from fastgen.kv.manager import KV_MANAGERS, KVManager, make_kv_manager, register_kv_manager

__all__ = ["KV_MANAGERS", "BlockAllocator", "KVCache", "KVManager", "make_kv_manager", "register_kv_manager"]
