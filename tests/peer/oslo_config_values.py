"""oslo.config's reading of a configuration, for tests/config_oslo.rs.

Registers the options as Nova's services have them: nova.conf (Nova's own, with Nova's
defaults for library options: control_exchange = nova), oslo.log's, oslo.messaging's, and
keystoneauth's session, auth and password-plugin options in the sections novasnap reads
them from. novasnap's own options ([novasnap]) have no upstream: they are registered from
novasnap's declaration (type and default) given in the request.

One JSON request a line on stdin, one JSON answer a line on stdout:
  {"describe": [option, ...]}  -> {"options": [{"kind", "deprecated", "secret", "upstream"}]}
  {"argv": [...], "home": dir, "env": {...}, "options": [option, ...]}
                               -> {"error": str|null, "values": [{"value"}|{"error"}, ...]}
where an option is {"section", "option", "type", "default"} as `novasnap check-config
--format json` lists it.
"""

import json
import logging
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.CRITICAL)

from keystoneauth1 import loading as ks_loading  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_config import types  # noqa: E402
from oslo_log import log as oslo_log  # noqa: E402
from oslo_messaging import opts as messaging_opts  # noqa: E402

import nova.conf  # noqa: E402
import nova.config  # noqa: E402
from nova import version  # noqa: E402

CONF = nova.conf.CONF
# What nova.config.parse_args does before parsing: oslo.log's options, Nova's library
# defaults (control_exchange = nova).
oslo_log.register_options(CONF)
nova.config.set_lib_defaults()
for group, opts in messaging_opts.list_opts():
    for opt in opts:
        try:
            CONF.register_opt(opt, group=None if group == "DEFAULT" else group)
        except cfg.DuplicateOptError:
            pass

TYPES = {
    "string": cfg.StrOpt,
    "boolean": cfg.BoolOpt,
    "integer": cfg.IntOpt,
    "float": cfg.FloatOpt,
    "list": cfg.ListOpt,
    "multi": cfg.MultiStrOpt,
    "hostdomain": cfg.HostDomainOpt,
}
# Options registered here from novasnap's declarations, not by upstream code.
ours = set()
keystoneauth_groups = set()


def group_of(section):
    return None if section == "DEFAULT" else section


def registered(section, name):
    group = group_of(section)
    if group is None:
        return CONF._opts.get(name)
    if group not in CONF._groups:
        return None
    return CONF._groups[group]._opts.get(name)


def register(options):
    """keystoneauth's options where novasnap reads auth options; novasnap's own."""
    for o in options:
        if o["option"] == "auth_url" and o["section"] not in keystoneauth_groups:
            group = o["section"]
            keystoneauth_groups.add(group)
            for register_options in (ks_loading.register_session_conf_options, ks_loading.register_auth_conf_options):
                try:
                    register_options(CONF, group)
                except cfg.DuplicateOptError:
                    pass
            for opt in ks_loading.get_auth_plugin_conf_options("password"):
                try:
                    CONF.register_opt(opt, group=group)
                except cfg.DuplicateOptError:
                    pass
    for o in options:
        key = (o["section"], o["option"])
        if key in ours:
            CONF.set_default(o["option"], o["default"], group=group_of(o["section"]))
        elif registered(*key) is None:
            kind = TYPES[o["type"]]
            extra = {"choices": o["choices"]} if o.get("choices") else {}
            CONF.register_opt(kind(o["option"], default=o["default"], **extra), group=group_of(o["section"]))
            ours.add(key)


def kind(opt):
    if isinstance(opt, cfg.MultiStrOpt):
        return "multi"
    t = opt.type
    for cls, name in (
        (types.HostDomain, "hostdomain"),
        (types.Boolean, "boolean"),
        (types.Integer, "integer"),
        (types.Float, "float"),
        (types.List, "list"),
    ):
        if isinstance(t, cls):
            return name
    return "string"


def describe(options):
    register(options)
    out = []
    for o in options:
        opt = registered(o["section"], o["option"])["opt"]
        deprecated = [[d.group or o["section"], d.name or o["option"]] for d in opt.deprecated_opts]
        t = opt.type
        out.append(
            {
                "kind": kind(opt),
                "deprecated": deprecated,
                "choices": list(t.choices) if getattr(t, "choices", None) else [],
                "min": getattr(t, "min", None),
                "secret": opt.secret,
                "upstream": (o["section"], o["option"]) not in ours,
            }
        )
    return {"options": out}


def plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read(request):
    for name in list(os.environ):
        if name.startswith("OS_") or name.startswith("SNAP"):
            del os.environ[name]
    os.environ["HOME"] = request["home"]
    os.environ.update(request["env"])
    register(request["options"])
    try:
        # nova.config.parse_args, for the program novasnap (its default files).
        CONF(request["argv"], project="nova", prog="novasnap", version=version.version_string())
    except BaseException as e:  # noqa: B902 - oslo raises SystemExit for some errors
        return {"error": f"{type(e).__name__}: {e}", "values": []}
    values = []
    for o in request["options"]:
        try:
            group = group_of(o["section"])
            value = CONF[o["option"]] if group is None else CONF[group][o["option"]]
            values.append({"value": plain(value)})
        except BaseException as e:  # noqa: B902 - RecursionError included
            values.append({"error": f"{type(e).__name__}: {e}"})
    return {"error": None, "values": values}


for line in sys.stdin:
    request = json.loads(line)
    answer = describe(request["describe"]) if "describe" in request else read(request)
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
