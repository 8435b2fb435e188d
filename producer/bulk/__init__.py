"""Bulk jobs: a JSONL file of requests run through the queue, one output line per input line.

Where a job goes, in order: `formats` (a line in, a record out: simple and OpenAI Batch), `inputs` (the input
file, or its copy staged in Redis), `state` (the job's record and counters in Redis), `running` (feeding lines
and tallying finished ones under a lease), `output` (the reply stream into the output file). Two ways to run
one: `attached` (`inferq bulk IN -o OUT`: this process feeds, collects and writes) and `detached` (`inferq
bulk submit`: staged in Redis, run in arq steps by any worker fleet process).
"""
