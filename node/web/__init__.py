"""The monitor's web dashboard: a small stdlib HTTP server (:mod:`node.web.dashboard`) and its static page
(``static/``: plain HTML/JS/CSS plus the vendored uPlot chart library, MIT, see ``static/LICENSE.uPlot``)."""
