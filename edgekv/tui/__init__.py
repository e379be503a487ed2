"""The `edgekv chat` terminal app (textual).

Entry point: `edgekv.tui.app.run_chat(model=..., doc=..., policy={...})`; tests build
`edgekv.tui.app.ChatApp(engine_factory)` with a scripted engine (tests/tui_fake.py).

    app.py               ChatApp: layout, state machine over typed messages, run_chat
    command_handlers.py  the /command handlers (a mixin of ChatApp)
    commands.py          the command registry, parser and help text
    jobs.py              one engine call at a time: the job queue
    session.py           what runs on the engine threads (load, prefill, answer, trim)
    messages.py          the typed messages from engine threads to the UI
    conversation.py      turns, the attached document, transcripts
    widgets.py           conversation column, answer boxes, figures panel, meters
    figures.py           bytes / rates / seconds as short text
    chat.tcss            the styling

Importing this package stays light: torch and the engine load on a worker thread.
"""
