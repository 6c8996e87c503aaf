"""The CNI verbs as the agent serves them: validation and result rendering (``spec``), the
service that owns the allocations (``service``), the datapath in worker threads (``datapath``)
and the DEL spool the plugin writes while the agent is down (``spool``)."""
