"""The tool schema the API tests offer the demo model on every API: its strings bounded
(`maxLength`), so that a 100-of-100 validity check finishes on a small model."""

FORECAST = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
