"""The command line's terminal display: text as it streams, one-line summaries, `inferq status`, the bulk
progress bar. It belongs to `inferq.cli`; the client library never imports it."""
