"""One APIRouter per resource: videos, storyboards, artifacts, admin, health."""
