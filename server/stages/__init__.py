"""The server's side of a method's stages, one module each: population.py and group.py (rounds of a
server-coordinated stage, round.py), user.py (the clients' private stage), with MTA's steps in
server/mta.py and the evaluations in server/evaluation.py. server/server_app.py lists them for the
runner (shared/runtime/runner.py), which takes the method's steps in order (shared/method/plan.py)."""
