"""vast-mcp: run GPU jobs on Vast.ai from an MCP client, with consent to cost and no instance left billing."""

__version__ = "0.1.0"
