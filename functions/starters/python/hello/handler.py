def handle(event, context):
    name = event.query.get("name", "world")
    context.logger.info("saying hello to %s", name)
    return f"Hello, {name}!\n"
