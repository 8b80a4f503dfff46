"""Observability: the event schema (tracepoints), and later logs, statistics and exports.

Consumers of the one event stream of :mod:`vkick.runtime.events`.
"""
