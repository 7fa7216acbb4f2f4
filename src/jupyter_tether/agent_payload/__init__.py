"""The supervisor payload that jupyter-tether injects into a dedicated remote kernel.

Standard library only, Python >= 3.9. Nothing here imports the controller or the MCP server.
``bundle`` packs these modules into one ``execute_request``; ``wire`` is the protocol.
"""
