"""The MCP tools, by what they act on; `server.py` registers them all."""
