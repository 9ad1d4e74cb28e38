"""Agents (design §5.5; docs/agents.md): the replicated registry's checks (``registry``), the
webhook client over HTTP/1.1 and HTTP/2 (``http1``, ``http2``, ``pool``), the AI SDK UI message
stream parser (``stream``), the assembler of one reply (``assemble``) and the dispatch engine
that runs on each group's leader (``engine``)."""
