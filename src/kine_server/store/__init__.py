"""The store the gRPC services use: reads in this process, write commands to the one writer.

store.py (what the services see), commands.py (the table of write commands), local.py (the
write side that carries them out, in the process that writes).
"""
