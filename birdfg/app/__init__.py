"""The comparison app (Gradio): `birdfg.app.ui.serve` runs it; `python app.py` is its CLI.

    sets.py          which model sets exist, each one's engine loaded once (a small LRU)
    session.py       the last comparison of each visitor
    view.py          the map menus (from each model's explanation methods)
    map_data.py      each model's maps as data for the page
    maps.js          drawing them in the browser (canvas), without a request
    mcp_server.py    --mcp: Gradio's MCP server, with two fixes
    presentation.py  what the widgets say (headers, labels, agreement, status)
    report.py        the Models tab (the stored evaluation report)
    batch.py         batch mode: table and CSV
    files.py         files handed to Gradio and their lifetime
    examples.py      the example photos and their credits
    worker.py        the one thread that runs model work
    head_start.py    a photo compared as soon as its upload lands
    page.py          the components and their layout
    handlers.py      what each event does (dicts keyed by component)
    ui.py            wiring and the server
"""
