"""The HTTP side: the FastAPI app (`app`), the Ingress deployment (`ingress`), the route modules (`routes/`,
one APIRouter per resource), the one admission path (`admission`), the schemas and views, errors, form
parsing and the events stream."""
