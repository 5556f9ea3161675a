"""The web dashboard (issue 26): server-rendered pages under /ui on the server's own
FastAPI app. Layer: above deploy (it builds on deploy.server.create_app), below cli (which
starts it: `tuneforge ui`, `tuneforge serve --ui`). See docs/ui-status.md.

  app.py       create_ui_app, ui_router: pages, auth (the API key in a cookie), JSON calls
  runview.py   what a run shows: status, curves, figures, log tail (run folder + job row)
  newrun.py    the New run form -> raw config -> validator messages per field, plan, YAML, CLI
  charts.py    inline SVG line charts, labelled at the line ends
  templates/   Jinja2 pages;  static/  ui.css, ui.js (no build step, nothing from the internet)
"""
