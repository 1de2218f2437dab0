"""A fleet on one machine: ``python -m fleet`` (``make fleet``) replaces courier instances one at
a time behind HAProxy, the ALB stand-in configured from terraform/alb.tf, under steady load.

``fleet.rolling`` is the scenario (its steps: deregister, terminate, launch, register),
``fleet.load`` the steady load, ``fleet.report`` the tables and the JSON. It runs on the chaos
rig (``chaos.rig``) and checks itself with chaos's accounting (``chaos.scenarios.common``);
HAProxy is ``courier_testkit.haproxy``.
"""
