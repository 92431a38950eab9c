"""One module per experiment family, registered by its name (the `family:` of its configs/*.yaml).

A family's render(writer, runs, ctx) writes its tables and figures through the writer and returns its typed
result (scripts/figures/results.py), which build keeps in ctx.results for the claims and later families. A
family without a module gets only the generic parts (setting line, run status, tuning table). communication
is a view over another family's runs (`runs_from` in its profile) and is called with that profile section.
"""
RENDER = {}


def register(name):
    def wrap(render):
        RENDER[name] = render
        return render
    return wrap


from scripts.figures.families import (ceiling, dp_recipe, ffa_table, heterogeneity, methods, slora,  # noqa: E402,F401
                                      sweeps)
from scripts.figures.families.communication import family_communication  # noqa: E402,F401
