"""The single round over Flower (https://flower.ai, the optional extra `[flower]`): a ServerApp that
sends the head (and, for model upload, the initial student) to every site's SuperNode, a ClientApp
that runs the site's own encryption (and training) and sends its folders back in chunks, and a
server that verifies them and writes the same work-directory layout as the file-copy flow
(layout.py), so `--mode server` and `--mode eval` follow unchanged.

  transfer.py  listing, chunks, staging and verification (no Flower types)
  site.py      the site's side      server.py  the server's side
  commands.py  the parties' msd_jax.main commands, run as child processes
  apps.py      the Flower ServerApp and ClientApp
  launch.py    python -m msd_jax.protocols.flower.launch: submit the round to a SuperLink
"""
