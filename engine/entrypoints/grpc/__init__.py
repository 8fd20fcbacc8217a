"""gRPC front end: anyserve.proto, its stubs generated at import time (codegen.py), and the
asyncio server over the TokenizerManager (server.py: ``start_grpc_server``)."""
