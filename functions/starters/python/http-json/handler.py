import json


def handle(event, context):
    if event.method == "GET":
        return {"message": "Send me JSON with POST", "path": event.path}
    try:
        payload = event.json()
    except (ValueError, json.JSONDecodeError):
        return {"status": 400, "body": {"error": "The body must be JSON."}}
    with context.span("process"):
        items = payload.get("items", [])
        total = sum(item.get("price", 0) * item.get("quantity", 1) for item in items)
    context.logger.info("priced %d items", len(items))
    return {"items": len(items), "total": round(total, 2), "invocation": context.invocation_id}
